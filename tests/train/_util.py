"""Shared helpers for the trainer tests: a tiny real-text corpus and a tiny config (hidden 32, 2 layers, seq 64)."""

from __future__ import annotations

import json
import pathlib
import random

WORDS = "the cat dog sat on mat ran fast slow red blue green a an big small over under".split()


def write_corpus(root: pathlib.Path, docs: int = 200, seed: int = 0) -> dict:
    """Write train.jsonl (``docs`` documents) and eval.txt under ``root``; return their paths."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    train = root / "train.jsonl"
    with open(train, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))}) + "\n")
    ev = root / "eval.txt"
    ev.write_text(" ".join(rng.choice(WORDS) for _ in range(1500)))
    return {"train": str(train), "eval": str(ev)}


def tiny_config(files: dict, **sections) -> dict:
    """A raw config dict for a 2-layer, hidden-32 LlamaCanon on byte-level text, seq 64."""
    cfg = {
        "name": "tiny",
        "model": {
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "vocab_size": 259,
            "canon_set": "ABCD",
            "max_seq_len": 64,
            "multiple_of": 32,
        },
        "data": {
            "kind": "text",
            "seq_len": 64,
            "text": {"train_files": [files["train"]], "eval_files": [files["eval"]], "eval_batches": 1},
        },
        "optim": {"lr": 0.01, "warmup_steps": 0, "weight_decay": 0.1, "z_loss": "official"},
        "train": {"steps": 8, "batch_size": 8, "log_every": 1},
        "checkpoint": {"every": 2, "keep": 5},
        "eval": {"at_end": False},
        "logging": {"progress": False, "tensorboard": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg
