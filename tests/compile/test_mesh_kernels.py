"""Compiled by the real compilers (deviceless) on an 8-chip v5e mesh (libtpu) and an 8-GPU H100 host (XLA GPU +
ptxas) while this process's default backend is the CPU: ``impl="auto"`` picks the Pallas kernels from the mesh's
devices and runs them under ``shard_map``, so the ops and tiny train steps compile and the compiled programs contain
the Mosaic kernels."""

import importlib.util
import os
import re
import types

import pytest

pytest.importorskip("libtpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from canon_jax import aot  # noqa: E402
from canon_jax.ops.conv import causal_conv1d  # noqa: E402
from canon_jax.ops.gla import gla  # noqa: E402
from canon_jax.ops.ssd import ssd  # noqa: E402
from canon_jax.train.sharding import make_mesh  # noqa: E402
from pallas_kernels.common import accelerator_backend  # noqa: E402

pytestmark = pytest.mark.compile

MESHES = {"fsdp8": (1, 8, 1), "data2_fsdp2_tensor2": (2, 2, 2)}
# Mosaic TPU / Mosaic GPU custom calls in compiled HLO
_KERNEL_CALL = {"tpu": r'custom_call_target="tpu_custom_call"', "gpu": r'custom_call_target="mosaic_gpu[a-z0-9_]*"'}


def _mesh(shape, target="v5e:2x4"):
    return make_mesh(
        types.SimpleNamespace(data=shape[0], fsdp=shape[1], tensor=shape[2]), devices=aot.get_target(target).devices
    )


def _mosaic_calls(compiled, platform="tpu") -> int:
    return len(re.findall(_KERNEL_CALL[platform], compiled.as_text()))


def _gpu_compiler_or_skip():
    if (
        importlib.util.find_spec("jax_plugins.xla_cuda12") is None
        or importlib.util.find_spec("nvidia.cuda_nvcc") is None
    ):
        pytest.skip("the CUDA plugin and nvcc wheels (aot extra) are not installed")
    if os.environ.get("JAX_PLATFORMS") != "cpu":
        pytest.skip("GPU targets compile only with JAX_PLATFORMS=cpu (else the CUDA plugin looks for a driver)")


def _arg(mesh, shape, dtype, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))


@pytest.mark.parametrize(
    "target,mesh_name", [("v5e:2x4", "fsdp8"), ("v5e:2x4", "data2_fsdp2_tensor2"), ("h100:1x1x8", "fsdp8")]
)
def test_ops_and_gradients_compile_with_mosaic_kernels_on_a_mesh(target, mesh_name):
    platform = "gpu" if target.startswith("h100") else "tpu"
    if platform == "gpu":
        _gpu_compiler_or_skip()
    assert jax.default_backend() == "cpu"
    mesh = _mesh(MESHES[mesh_name], target)
    bf = jnp.bfloat16
    b, t = 8, 256

    def step(x, w, seg, s0, q, k, v, g, xs, dt, a, bm, cm):
        def loss(x, w, s0, q, k, v, g, xs, bm, cm):
            y = causal_conv1d(x, w, residual=True, segment_ids=seg, initial_state=s0, impl="auto")
            o, _ = gla(q, k, v, g, impl="auto")
            z, _ = ssd(xs, dt, a, bm, cm, impl="auto", chunk_size=64)
            return sum(jnp.sum(u.astype(jnp.float32) ** 2) for u in (y, o, z))

        return jax.value_and_grad(loss, argnums=tuple(range(10)))(x, w, s0, q, k, v, g, xs, bm, cm)

    bt, bth = ("data", "fsdp"), (("data", "fsdp"), None, "tensor", None)
    args = (
        _arg(mesh, (b, t, 512), bf, (bt, None, "tensor")),
        _arg(mesh, (4, 512), jnp.float32, ()),
        _arg(mesh, (b, t), jnp.int32, (bt, None)),
        _arg(mesh, (b, 512, 4), bf, (bt, "tensor", None)),
        *(_arg(mesh, (b, t, 4, 128), bf, bth) for _ in range(3)),
        _arg(mesh, (b, t, 4, 128), jnp.float32, bth),
        _arg(mesh, (b, t, 4, 64), bf, bth),
        _arg(mesh, (b, t, 4), jnp.float32, (bt, None, "tensor")),
        _arg(mesh, (4,), jnp.float32, ()),
        _arg(mesh, (b, t, 1, 128), bf, (bt, None, None, None)),
        _arg(mesh, (b, t, 1, 128), bf, (bt, None, None, None)),
    )
    with jax.set_mesh(mesh):
        # from the mesh, although the default backend is the CPU
        assert accelerator_backend() == platform
        compiled = jax.jit(step).lower(*args).compile()
    # conv, GLA and SSD: at least one forward and one backward kernel each (shapes the GPU kernels take: Dk, Dv
    # multiples of 64, chunk 64)
    assert _mosaic_calls(compiled, platform) >= 6, compiled.as_text()[:2000]


MODELS = {
    "llama_canon": {"canon_set": "ABCD", "segment_aware": True},
    "gla_canon": {"arch": "gla", "canon_set": "AbBCD"},
    "mamba2_canon": {"arch": "mamba2", "canon_set": "AbBCD", "ssm_state_size": 64},
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_train_step_compiles_with_kernels_on_a_tpu_mesh(name, tmp_path):
    from canon_jax.train.config import config_from_dict
    from canon_jax.train.trainer import BATCH_KEYS, Trainer
    from tests.train._util import tiny_config, write_corpus

    raw = tiny_config(
        write_corpus(tmp_path, docs=4),
        model={
            "hidden_size": 256,
            "num_heads": 2,
            "num_layers": 1,
            "multiple_of": 128,
            "dtype": "bfloat16",
            "max_seq_len": 256,
            **MODELS[name],
        },
        data={"seq_len": 256},
        mesh={"data": 2, "fsdp": 2, "tensor": 2},
    )
    tr = Trainer(config_from_dict(raw), devices=aot.get_target("v5e:2x4").devices)
    batch = {k: jax.ShapeDtypeStruct((8, 256), jnp.int32) for k in BATCH_KEYS}
    compiled = tr._step.lower(tr.abstract_state, batch).compile()  # no mesh context needed: the step sets its own
    n = _mosaic_calls(compiled)
    # every Canon position of the layer runs the conv kernel forward and backward (more calls where a position
    # convolves several projections separately); the linear mixers add their scan's forward and backward
    positions = len(MODELS[name]["canon_set"])
    assert n >= 2 * positions + (2 if name != "llama_canon" else 0), n
