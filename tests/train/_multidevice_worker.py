"""Run by test_multidevice.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS set by the caller)."""

import json
import pathlib
import sys

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")


def main(tmp):
    from canon_jax.train.checkpoint import Checkpointer
    from canon_jax.train.config import config_from_dict
    from canon_jax.train.text_data import make_text_dataset
    from canon_jax.train.trainer import Trainer
    from tests.train._util import tiny_config, write_corpus

    assert jax.device_count() == 8, jax.devices()
    tmp = pathlib.Path(tmp)
    files = write_corpus(tmp / "corpus")
    out = {}

    def cfg_for(data, fsdp, tensor, **train):
        return config_from_dict(
            tiny_config(files, mesh={"data": data, "fsdp": fsdp, "tensor": tensor}, train={"steps": 8, **train})
        )

    cfg1, cfg8 = cfg_for(1, 1, 1), cfg_for(2, 2, 2)
    tr1 = Trainer(cfg1, devices=jax.devices()[:1])
    tr8 = Trainer(cfg8)
    batch = next(iter(make_text_dataset(cfg1.data, split="train", batch_size=8)))
    s1, s8 = tr1.init_state(), tr8.init_state()
    host = lambda t: jax.tree.map(np.asarray, jax.device_get(t))
    p1, p8 = host(s1["params"]), host(s8["params"])
    out["init_equal"] = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    # the layout really is sharded: an MLP kernel is split over fsdp and tensor
    spec = {jax.tree_util.keystr(k): str(v.sharding.spec) for k, v in jax.tree_util.tree_leaves_with_path(s8["params"])}
    out["specs"] = {k: v for k, v in spec.items() if "mlp" in k and "kernel" in k}
    for _ in range(2):
        s1, m1 = tr1.step(s1, batch)
        s8, m8 = tr8.step(s8, batch)
    out["loss"] = [float(m1["loss"]), float(m8["loss"])]
    out["grad_norm"] = [float(m1["grad_norm"]), float(m8["grad_norm"])]
    p1, p8 = host(s1["params"]), host(s8["params"])
    out["max_param_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    o1, o8 = host(s1["opt_state"]), host(s8["opt_state"])
    out["max_opt_diff"] = max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(jax.tree.leaves(o1), jax.tree.leaves(o8))
    )

    # save on the 2x2x2 mesh, restore onto (data 1, fsdp 4, tensor 2) and onto a single device
    ck = Checkpointer(tmp / "ckpt", every=1, keep=2, async_save=True)
    ck.save(2, s8, {"pos": 2}, {"cfg": "x"}, force=True)
    ck.wait()
    ref = host(s8)
    restored = {}
    for name, (cfg, devices) in {
        "fsdp4_tensor2": (cfg_for(1, 4, 2), None),
        "single": (cfg1, jax.devices()[:1]),
    }.items():
        tr = Trainer(cfg, devices=devices)
        step, state, data_state = Checkpointer(tmp / "ckpt", 1, 2).restore(tr.restore_target())
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(host(state)), jax.tree.leaves(ref)))
        layout_ok = all(x.sharding == s for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(tr.state_shardings)))
        restored[name] = {"step": step, "data": data_state, "equal": same, "layout": layout_ok}
        if name == "single":  # training continues from it as on the source mesh (same program as tr1: cached)
            state, m = tr.step(state, batch)
            restored[name]["next_loss"] = float(m["loss"])
    s8, m8 = tr8.step(s8, batch)
    out["next_loss_source"] = float(m8["loss"])
    out["restored"] = restored
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
