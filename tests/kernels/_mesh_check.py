"""Run by test_mesh_dispatch.py in a subprocess with 8 simulated CPU devices.

Under ``jax.set_mesh`` the ops route their Pallas kernels (interpret mode) through ``shard_map`` inside the op
dispatch; values and gradients must equal the unsharded XLA path. Then one trainer step of tiny models with
``kernel_impl="pallas_interpret"`` must equal the ``kernel_impl="xla"`` step on the same mesh.
"""

import functools
import json
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from canon_jax.ops.conv import causal_conv1d  # noqa: E402
from canon_jax.ops.gla import gla  # noqa: E402
from canon_jax.ops.ssd import ssd  # noqa: E402
from canon_jax.train.sharding import make_mesh  # noqa: E402

MESHES = {"fsdp8": (1, 8, 1), "data2_fsdp4": (2, 4, 1), "data2_fsdp2_tensor2": (2, 2, 2)}


def _close(a, b, what):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5, err_msg=what)


def _value_and_grad(op, impl, n_diff, *args):
    """``op(impl, *args)`` (a pytree of arrays) and the gradient of a scalar of it w.r.t. the first ``n_diff`` args."""
    diff, rest = args[:n_diff], args[n_diff:]
    out, vjp = jax.vjp(lambda *d: op(impl, *d, *rest), *diff)
    cot = jax.tree.map(lambda l: jnp.cos(l.astype(jnp.float32)).astype(l.dtype), out)  # d/dl of sum(sin(l))
    return out, vjp(cot)


def _check(name, op, args, n_diff):
    """The kernel under each mesh (values and gradients) equals XLA without a mesh."""
    ref = jax.jit(functools.partial(_value_and_grad, op, "xla", n_diff))(*args)
    fn = functools.partial(_value_and_grad, op, "pallas_interpret", n_diff)
    for mname, shape in MESHES.items():
        with jax.set_mesh(make_mesh(types.SimpleNamespace(data=shape[0], fsdp=shape[1], tensor=shape[2]))):
            jaxpr = str(jax.make_jaxpr(fn)(*args))
            assert "shard_map" in jaxpr and "pallas_call" in jaxpr, f"{name}: kernel not under shard_map"
            got = jax.jit(fn)(*args)
        for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(ref))):
            _close(a, b, f"{mname}/{name} output/gradient {i}")


def ops_under_meshes():
    rng = np.random.default_rng(0)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    # conv with segment ids, initial state, bias, SiLU and residual; batch 8 splits on every mesh
    seg = jnp.asarray(np.sort(rng.integers(1, 4, (8, 13)), axis=1), jnp.int32)
    conv = lambda impl, x, w, b, s0: causal_conv1d(
        x, w, bias=b, activation="silu", residual=True, segment_ids=seg, initial_state=s0, impl=impl
    )
    _check("conv", conv, (f32(8, 13, 32), f32(4, 32), f32(32), f32(8, 32, 4)), 4)
    # batch 6 does not divide data*fsdp (8 or 4 shards): replicated, or split over a prefix of the batch axes
    conv6 = lambda impl, x, w: causal_conv1d(x, w, impl=impl)
    _check("conv_batch6", conv6, (f32(6, 9, 16), f32(3, 16)), 2)
    # GLA with an initial state; 4 heads over tensor
    g = jnp.asarray(np.log(rng.uniform(0.6, 1.0, (8, 11, 4, 8))), jnp.float32)
    gla_op = lambda impl, q, k, v, g, s0: gla(q, k, v, g, initial_state=s0, chunk_size=8, impl=impl)
    _check("gla", gla_op, (f32(8, 11, 4, 8), f32(8, 11, 4, 8), f32(8, 11, 4, 16), g, f32(8, 4, 8, 16)), 5)
    # SSD with 2 groups (split like heads), D and an initial state
    dt = jnp.asarray(rng.uniform(0.01, 0.3, (8, 11, 4)), jnp.float32)
    a = jnp.asarray(-rng.uniform(0.5, 3.0, 4), jnp.float32)
    ssd_op = lambda impl, x, dt, b, c, d, s0, a: ssd(x, dt, a, b, c, d, initial_state=s0, chunk_size=8, impl=impl)
    _check("ssd", ssd_op, (f32(8, 11, 4, 8), dt, f32(8, 11, 2, 8), f32(8, 11, 2, 8), f32(4), f32(8, 4, 8, 8), a), 7)
    return sorted(MESHES)


def train_steps(tmp):
    from canon_jax.train.config import config_from_dict
    from canon_jax.train.text_data import make_text_dataset
    from canon_jax.train.trainer import Trainer
    from tests.train._util import tiny_config, write_corpus

    files = write_corpus(pathlib.Path(tmp) / "corpus")
    # Mamba2 with all Canon positions: conv and SSD kernels in one step (segment ids are covered op by op above;
    # the linear mixers do not take segment_aware)
    models = {"mamba2_canon": {"arch": "mamba2", "canon_set": "AbBCD", "ssm_state_size": 8, "mamba_chunk_size": 16}}
    out = {}
    for name, extra in models.items():
        res = {}
        for impl in ("xla", "pallas_interpret"):
            cfg = config_from_dict(
                tiny_config(files, model={**extra, "kernel_impl": impl}, mesh={"data": 2, "fsdp": 2, "tensor": 2})
            )
            tr = Trainer(cfg)
            if impl == "pallas_interpret":  # the kernels really run under shard_map in the compiled step
                txt = tr._step.lower(
                    tr.abstract_state,
                    {
                        k: jax.ShapeDtypeStruct((8, 64), jnp.int32)
                        for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")
                    },
                ).as_text()
                res["shard_map_in_step"] = "shmap_body" in txt or "sdy.manual_computation" in txt
            batch = next(iter(make_text_dataset(cfg.data, split="train", batch_size=8)))
            state, m = tr.step(tr.init_state(), batch)
            res[impl] = {
                "loss": float(m["loss"]),
                "grad_norm": float(m["grad_norm"]),
                "params": [np.asarray(p) for p in jax.tree.leaves(jax.device_get(state["params"]))],
            }
        a, b = res["xla"], res["pallas_interpret"]
        out[name] = {
            "loss": [a["loss"], b["loss"]],
            "grad_norm": [a["grad_norm"], b["grad_norm"]],
            "max_param_diff": max(float(np.max(np.abs(x - y))) for x, y in zip(a["params"], b["params"])),
            "shard_map_in_step": res["shard_map_in_step"],
        }
    return out


def main(tmp):
    assert jax.device_count() == 8, jax.devices()
    out = {"ops": ops_under_meshes(), "train": train_steps(tmp)}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
