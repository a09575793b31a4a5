"""The 1B paper presets with Canon layers, reduced to 2 layers (full width, full sequence length, one sequence per
device), compiled by the real compilers for an 8-chip TPU slice and an 8-GPU H100 host: the training step of
``experiments.train`` compiles, its state is sharded as the FSDP mesh says, and the Canon convs (and the GLA / SSD
scans) run as Pallas kernels."""

import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[2]
PRESETS = sorted((ROOT / "configs" / "experiments").glob("*_1b.yaml"))
BATCH = 8  # one sequence per device


def test_presets_found():
    assert len(PRESETS) == 8 and len(CANON) == 4, [p.name for p in PRESETS]


# The Canon presets on both machines. Their kernel calls include all of their twins': the conv presets run Canon-b,
# one of the AbCD positions, through the same kernels at the same shapes, and llama_1b has no kernel of its own.
# Each compile costs 1-2 minutes of CPU (TPU ~100 s, GPU ~55 s on one core), so the twins are left to
# docs/scaling.md.
CANON = [p for p in PRESETS if "_canon_" in p.name]
CASES = [(p, t) for t in ("v5p:2x2x2", "h100:1x1x8") for p in CANON]


@pytest.mark.parametrize("preset,target", CASES, ids=lambda x: getattr(x, "stem", x))
def test_reduced_preset_compiles_with_kernels(preset, target):
    import jax

    from canon_jax.aot import get_target
    from canon_jax.train.config import load_config
    from canon_jax.train.trainer import Trainer
    from experiments.compile import compile_config

    cfg = load_config(preset, ["model.num_layers=2", f"train.batch_size={BATCH}"])
    tgt = get_target(target)
    r = compile_config(cfg, tgt)
    assert r["compiled"] and r["fits"], r
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    mem = r["memory"]
    # Arguments: the train state, each leaf split as its sharding says (FSDP over 8; the few dimensions 8 does not
    # divide are replicated), and the [batch, seq] batch arrays the step reads (jit drops the unused segment ids and
    # positions unless the model is segment-aware), split over the batch. The state is donated: the new state reuses
    # its buffers. Layout padding of small leaves is allowed for (0.1 %).
    tr = Trainer(cfg, devices=tgt.devices)
    shard_bytes = jax.tree.map(
        lambda a, sh: math.prod(sh.shard_shape(a.shape)) * a.dtype.itemsize, tr.abstract_state, tr.state_shardings
    )
    state = sum(jax.tree.leaves(shard_bytes))
    t = cfg.data.seq_len
    n_batch = 5 if cfg.model.segment_aware else 3
    assert abs(mem["argument"] - (state + n_batch * 4 * BATCH * t // 8)) <= 1e-3 * state, (mem, state)
    assert abs(mem["alias"] - state) <= 1e-3 * state, (mem, state)
    # ... which is close to the float32 params + two Adam moments split 8 ways
    assert 12 * r["n_params"] / 8 <= state <= 1.02 * 12 * r["n_params"] / 8
    assert r["tokens_per_device"] == t
    # at least one kernel call (the forward) per Canon position per layer
    assert r["pallas_kernels"] >= len(cfg.model.canon_set) * cfg.model.num_layers, r
