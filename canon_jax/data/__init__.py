"""canon_jax.data: the synthetic playground (Depo, Brevo, Capo, Mano, Lano), vocabulary, packing, grain pipeline.

Public API::

    get_task(name, **params) -> Task          # task.sample(i, split, seed) -> Sample(tokens, labels, meta)
    DataConfig, TaskSpec, make_dataset(cfg, split=..., batch_size=..., process_index=0, process_count=1)
    Vocabulary(tasks), vocab_size(tasks), pack_samples(samples, seq_len), TASK_NAMES, PRESETS, preset(name)
"""
from canon_jax.data.base import (ANSWER, BOS, EOS, NUM_SPECIAL, PAD, QUERY, SEP, TASK_NAMES, Sample, Task, get_task,
                                 task_defaults)
from canon_jax.data.packing import PackIterDataset, SampleTooLongError, build_window, pack_samples
from canon_jax.data.pipeline import (PRESETS, DataConfig, TaskMixtureMapDataset, TaskSpec, make_dataset,
                                     make_sample_dataset, preset)
from canon_jax.data.vocab import Vocabulary, vocab_size

__all__ = [
    "ANSWER", "BOS", "EOS", "NUM_SPECIAL", "PAD", "QUERY", "SEP", "TASK_NAMES", "Sample", "Task", "get_task",
    "task_defaults", "PackIterDataset", "SampleTooLongError", "build_window", "pack_samples", "PRESETS", "DataConfig",
    "TaskMixtureMapDataset", "TaskSpec", "make_dataset", "make_sample_dataset", "preset", "Vocabulary", "vocab_size",
]
