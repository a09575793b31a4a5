"""End to end on the synthetic playground: a few steps of a tiny LlamaCanon on a Depo1 + Brevo1 mix, then the
periodic evaluation through canon_jax.eval (teacher-forced logits for Depo, generation for Brevo)."""

import json

from canon_jax.train.config import config_from_dict
from canon_jax.train.metrics import read_metrics
from canon_jax.train.trainer import train


def test_tiny_synthetic_run_logs_train_and_eval_metrics(tmp_path):
    raw = {
        "model": {
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "vocab_size": 64,
            "canon_set": "ABCD",
            "max_seq_len": 128,
            "multiple_of": 32,
        },
        "data": {
            "seq_len": 128,
            "tasks": [
                {"name": "depo1", "params": {"N": 6, "K": 2, "mini_vocab": 8}},
                {"name": "brevo1", "params": {"N": 6}},
            ],
        },
        "optim": {"lr": 0.01, "warmup_steps": 1},
        "train": {"steps": 3, "batch_size": 4, "log_every": 1},
        "checkpoint": {"every": 3},
        "eval": {"every": 2, "num_samples": 4, "batch_size": 4},
        "logging": {"progress": False},
    }
    summary = train(config_from_dict(raw), tmp_path)
    assert summary["step"] == 3 and not summary["preempted"]
    recs = read_metrics(tmp_path / "metrics.jsonl")
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3]
    assert {"step", "loss", "nll", "lr", "grad_norm", "tokens_per_s", "loss_tokens"} <= set(train_recs[-1])
    evals = [r for r in recs if "eval" in r]
    assert [(r["step"], r["eval"]) for r in evals] == [(2, "depo1"), (2, "brevo1"), (3, "depo1"), (3, "brevo1")]
    depo = evals[-2]
    assert {"depo1/accuracy_k1", "depo1/accuracy_k2"} <= set(depo)
    assert 0.0 <= depo["depo1/accuracy_k1"] <= 1.0 and 0.0 <= evals[-1]["brevo1/accuracy"] <= 1.0
    assert json.loads((tmp_path / "config.json").read_text())["data"]["tasks"][1]["name"] == "brevo1"
    assert list((tmp_path / "tensorboard").iterdir())  # event files beside metrics.jsonl
