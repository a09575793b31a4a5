"""``experiments.compile.find_batch``: the binary search over compiles, against a memory model with a known answer
(the compiler is replaced, so this runs without the aot extra)."""

import types

import pytest

from canon_jax.train.config import config_from_dict

GiB = 1 << 30


@pytest.mark.parametrize(
    "fixed,per_seq,expect_max,expect_accum",
    [
        (1.0, 0.3, 50, 2),  # 1 + 0.3 b <= 16  ->  b <= 50; batch 256 on 4 devices = 64 per device -> 2 x 32
        (15.5, 0.3, 1, 64),  # only one sequence per device fits
        (2.0, 0.01, 1024, 1),  # capped search: everything up to the cap fits
        (16.5, 0.1, 0, None),  # nothing fits on this mesh
    ],
)
def test_find_batch_against_linear_memory_model(monkeypatch, fixed, per_seq, expect_max, expect_accum):
    import experiments.compile as c

    calls = []

    def fake_compile(cfg, target):
        micro = cfg.train.batch_size // 4 // cfg.train.grad_accum
        total = int((fixed + per_seq * micro) * GiB)
        calls.append((cfg.train.batch_size, cfg.train.grad_accum))
        return {
            "mesh": {"data": 1, "fsdp": 4, "tensor": 1},
            "compiled": True,
            "fits": total <= 16 * GiB,
            "memory": {"total": total},
            "hbm_bytes": 16 * GiB,
            "grad_accum": cfg.train.grad_accum,
            "sequences_per_device": cfg.train.batch_size / 4,
        }

    monkeypatch.setattr(c, "compile_config", fake_compile)
    cfg = config_from_dict(
        {"data": {"tasks": [{"name": "depo1"}], "seq_len": 128}}, ["train.batch_size=256", "model.max_seq_len=128"]
    )
    target = types.SimpleNamespace(num_devices=4)
    out = c.find_batch(cfg, target, log=lambda *_: None)
    assert out["max_per_device_batch"] == expect_max
    assert out.get("min_grad_accum") == expect_accum
    if expect_accum not in (None, 1):
        assert out["min_grad_accum_fits"] is True
    assert len(calls) <= 2 * 11 + 2  # doubling up to the cap, then bisection
