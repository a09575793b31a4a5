"""Each 1B paper preset, reduced to 2 layers (full width, full sequence length, one sequence per device), compiled
by the real compilers for an 8-chip TPU slice and an 8-GPU H100 host: the training step of ``experiments.train``
compiles, its state is sharded as the FSDP mesh says, and the Canon convs / linear scans run as Pallas kernels."""
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[2]
PRESETS = sorted((ROOT / "configs" / "experiments").glob("*_1b.yaml"))
TARGETS = ("v5p:2x2x2", "h100:1x1x8")
BATCH = 8  # one sequence per device


def test_presets_found():
    assert len(PRESETS) == 8, [p.name for p in PRESETS]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_reduced_preset_compiles_with_kernels(preset, target):
    from canon_jax.aot import get_target
    from canon_jax.train.config import load_config
    from experiments.compile import compile_config

    cfg = load_config(preset, ["model.num_layers=2", f"train.batch_size={BATCH}"])
    tgt = get_target(target)
    r = compile_config(cfg, tgt)
    assert r["compiled"] and r["fits"], r
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    mem = r["memory"]
    # Arguments: float32 params + the two Adam moments, each split 8 ways by FSDP (every 1B dimension divides 8), and
    # the five [batch, seq] int32/float32 batch arrays split over the batch. Scalars (step, counts) are negligible.
    n, t = r["n_params"], cfg.data.seq_len
    state = 3 * 4 * n / 8
    expected_args = state + 5 * 4 * BATCH * t / 8
    assert abs(mem["argument"] - expected_args) <= 0.01 * expected_args, (mem, expected_args)
    # The state is donated: the new state reuses its buffers.
    assert abs(mem["alias"] - state) <= 0.01 * state, (mem, state)
    assert r["tokens_per_device"] == t
    mc = cfg.model
    if mc.canon_set or mc.arch != "llama":  # a Canon conv or a linear-attention scan: Pallas kernels
        assert r["pallas_kernels"] > 0, r
