"""canon_jax.data: the synthetic playground (Depo, Brevo, Capo, Mano, Lano), vocabulary, packing, grain pipeline.

Public API::

    get_task(name, **params) -> Task          # task.sample(i, split, seed) -> Sample(tokens, labels, meta)
    task_dataset(task, split, seed)           # one task's stream as a grain MapDataset
    DataConfig, TaskSpec, make_dataset(cfg, split=..., batch_size=..., process_index=0, process_count=1)
    Vocabulary(tasks), vocab_size(tasks), pack_samples(samples, seq_len), TASK_NAMES, PRESETS, preset(name)
    tokenize_corpus(inputs, out_dir, tokenizer), TokenShards(dir)   # pre-tokenised real-text corpora

Names are imported lazily so that using a task does not import grain.
"""

from __future__ import annotations

import importlib

_LAZY = {
    **{
        n: "canon_jax.data.base"
        for n in (
            "ANSWER",
            "BOS",
            "EOS",
            "NUM_SPECIAL",
            "PAD",
            "QUERY",
            "SEP",
            "TASK_NAMES",
            "Sample",
            "Task",
            "get_task",
            "task_defaults",
        )
    },
    **{n: "canon_jax.data.packing" for n in ("PackIterDataset", "SampleTooLongError", "build_window", "pack_samples")},
    **{
        n: "canon_jax.data.pipeline"
        for n in (
            "PRESETS",
            "DataConfig",
            "TaskMixtureMapDataset",
            "TaskSpec",
            "make_dataset",
            "make_sample_dataset",
            "preset",
            "task_dataset",
        )
    },
    **{n: "canon_jax.data.vocab" for n in ("Vocabulary", "vocab_size")},
    **{n: "canon_jax.data.shards" for n in ("TokenShards", "tokenize_corpus")},
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'canon_jax.data' has no attribute {name!r}")
