"""``python -m experiments.compile`` against the real compilers: result fields, a program over HBM reported as
"does not fit", and the batch-vs-mesh config error on a 256-chip slice (raised before anything is compiled)."""

import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[2]
TINY = [
    "model.hidden_size=64",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.canon_set=",
    "model.max_seq_len=256",
    "data.seq_len=256",
    "model.dtype=float32",
]


def _run(args, capsys):
    from experiments.compile import main

    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_result_fields_and_flops(tmp_path, capsys):
    js = tmp_path / "r.json"
    rc, out, _ = _run(
        [
            "--config",
            str(ROOT / "configs/experiments/llama_1b.yaml"),
            "--target",
            "v5e:2x2",
            "--json",
            str(js),
            *sum((["--set", s] for s in TINY + ["train.batch_size=8"]), []),
        ],
        capsys,
    )
    assert rc == 0, out
    r = json.loads(js.read_text())
    assert r["compiled"] and r["fits"] and "FITS" in out
    assert r["num_devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r["micro_batch_per_device"] == 2 and r["tokens_per_device"] == 8 * 256 / 4
    # model FLOPs: 6 * (all parameters but the input table) * tokens + 12 * L * d * T * tokens (untied embeddings)
    d, v, layers, t = 64, 32000, 1, 256
    n_matmul = r["n_params"] - v * d
    assert n_matmul > d * v  # the output head is counted
    tokens = 8 * t
    assert r["model_flops_per_step"] == pytest.approx((6 * n_matmul + 12 * layers * d * t) * tokens, rel=1e-12)
    mem = r["memory"]
    assert mem["total"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
    assert r["hbm_bytes"] == 16 << 30 and r["compile_seconds"] > 0


def test_over_hbm_is_reported_not_raised(capsys):
    # float32 params + two Adam moments of a 69 B-parameter model (a 4M-token vocabulary at width 8192, untied) are
    # 96 GiB per GPU over 8-way FSDP, more than an H100 holds, whatever the step does with its activations.
    big = ["model.hidden_size=8192", "model.num_heads=64", "model.vocab_size=4194304", "train.batch_size=8"]
    rc, out, _ = _run(
        [
            "--config",
            str(ROOT / "configs/experiments/llama_1b.yaml"),
            "--target",
            "h100:1x1x8",
            *sum((["--set", s] for s in TINY + big), []),
        ],
        capsys,
    )
    assert rc == 1, out
    assert "DOES NOT FIT" in out and "of HBM 79.11 GiB" in out


def test_batch_not_dividing_the_mesh_is_a_config_error(capsys):
    rc, _, err = _run(
        ["--config", str(ROOT / "configs/experiments/gla5_conv_1b.yaml"), "--target", "v5e:16x16"], capsys
    )
    assert rc == 2
    assert err.strip() == (
        "config error: train.batch_size: 128 is not divisible by the data-parallel size "
        "mesh.data*mesh.fsdp = 1*256 = 256 (on 256 devices); set train.batch_size=256, "
        "or mesh.data=1 mesh.fsdp=128 mesh.tensor=2"
    )
