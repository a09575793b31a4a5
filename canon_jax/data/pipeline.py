"""The grain input pipeline: task mixture -> shuffle -> process shard -> (worker processes) -> packing -> batches.

    ds = make_dataset(DataConfig(tasks=[TaskSpec("depo1", params={"N": 50})], seq_len=512), split="train",
                      batch_size=8)
    it = iter(ds); batch = next(it)          # dict of numpy arrays [8, 512]
    state = it.get_state(); ...; it.set_state(state)   # exact resume

Stages and why they are ordered this way:

1. :class:`TaskMixtureMapDataset` — an (effectively infinite, 2**62 long) ``MapDataset``: element ``j`` picks a task
   with probability ∝ its weight from a key of (seed, split, j) and is that task's sample ``j``; a pure function of
   ``j``, so every stage below can address it.
2. ``WindowShuffleMapDataset`` — shuffles indices inside windows of ``shuffle_buffer`` (the iid tasks do not need it;
   Capo's per-person exposures and any finite-index logic do).
3. ``slice(process_index::process_count)`` — each JAX process reads only its own shard.
4. ``to_iter_dataset`` + optional ``mp_prefetch`` — worker processes generate samples; grain slices the index space
   ``worker::num_workers`` and interleaves round-robin, so the sample order does not depend on ``num_workers``.
5. :class:`~canon_jax.data.packing.PackIterDataset` — runs in the main process *after* the workers (packing is
   stateful: done per worker it would make the windows depend on the worker count).
6. ``batch(batch_size, drop_remainder=True)``.

The iterator state (``get_state``/``set_state``) is grain's: parent positions plus the packer's pending sample.
With workers, scripts must guard their entry point with ``if __name__ == "__main__":``; absl flags are marked parsed
here if nobody parsed them (grain's workers read them).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from canon_jax.data import base
from canon_jax.data.packing import LOSS_ON, PackIterDataset
from canon_jax.data.rng import mix_key, split_id
from canon_jax.data.vocab import Vocabulary

STREAM_LENGTH = 1 << 62
_MIX_TAG = 0x313A


@dataclasses.dataclass
class TaskSpec:
    """One task of a mix: registry ``name``, sampling ``weight`` and parameter overrides ``params``."""

    name: str
    weight: float = 1.0
    params: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        base.task_class(self.name)  # validates the name
        if not self.weight > 0:
            raise ValueError(f"task {self.name!r}: weight must be > 0, got {self.weight}")
        self.params = dict(self.params or {})


@dataclasses.dataclass
class DataConfig:
    """Configuration of the synthetic-data pipeline.

    tasks: the mix (``TaskSpec``s or dicts ``{"name", "weight", "params"}``).
    seq_len: packing window (4096 as in the paper's 4k context; 256–1024 for CPU runs, see :data:`PRESETS`).
    loss_on: ``"answer"`` (answer tokens only, default) or ``"all"``.
    seed: data seed (sample i of every task is a function of it).
    shuffle_buffer: size of the index windows shuffled together (0 = no shuffle).
    num_workers: grain worker processes (0 = generate in the main process); worker_buffer_size: per-worker prefetch.
    split_long: cut samples longer than seq_len into windows instead of failing.
    """

    tasks: list = dataclasses.field(default_factory=lambda: [TaskSpec("depo1")])
    seq_len: int = 4096
    loss_on: str = "answer"
    seed: int = 0
    shuffle_buffer: int = 4096
    num_workers: int = 0
    worker_buffer_size: int = 16
    split_long: bool = False

    def __post_init__(self):
        specs = []
        for t in self.tasks:
            if isinstance(t, TaskSpec):
                specs.append(t)
            elif isinstance(t, str):
                specs.append(TaskSpec(t))
            elif isinstance(t, Mapping):
                unknown = sorted(set(t) - {"name", "weight", "params"})
                if unknown:
                    raise ValueError(f"task entry {dict(t)} has unknown keys {unknown}; valid: name, weight, params")
                specs.append(TaskSpec(t["name"], float(t.get("weight", 1.0)), dict(t.get("params") or {})))
            else:
                raise TypeError(f"a task must be a TaskSpec, a dict or a name, got {t!r}")
        if not specs:
            raise ValueError("DataConfig.tasks must name at least one task")
        self.tasks = specs
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"DataConfig.loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if self.seq_len < 2:
            raise ValueError(f"DataConfig.seq_len must be >= 2, got {self.seq_len}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"DataConfig.shuffle_buffer must be >= 0 (0 = no shuffle), got {self.shuffle_buffer}")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers must be >= 0, got {self.num_workers}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown DataConfig field(s) {unknown}; valid fields: {sorted(fields)}")
        return cls(**dict(d))

    def vocabulary(self) -> Vocabulary:
        return Vocabulary([(t.name, t.params) for t in self.tasks])

    def vocab_size(self) -> int:
        return self.vocabulary().size


# Presets: the official task sizes at 4096, and CPU-sized ones (``cpu_*``) with reduced problem sizes whose longest
# (test-difficulty) sample still fits the window.
PRESETS: dict[str, dict] = {
    "depo1": dict(tasks=[{"name": "depo1"}], seq_len=4096),
    "depo2": dict(tasks=[{"name": "depo2"}], seq_len=4096),
    "brevo1": dict(tasks=[{"name": "brevo1"}], seq_len=4096),
    "brevo2": dict(tasks=[{"name": "brevo2"}], seq_len=4096),
    "mano": dict(tasks=[{"name": "mano"}], seq_len=4096),
    "capo": dict(tasks=[{"name": "capo"}], seq_len=4096),
    "lano": dict(tasks=[{"name": "lano"}], seq_len=4096),
    "cpu_depo1_256": dict(tasks=[{"name": "depo1", "params": {"N": 50, "K": 4}}], seq_len=256),
    "cpu_brevo1_256": dict(tasks=[{"name": "brevo1", "params": {"N": 20}}], seq_len=256),
    "cpu_mano_256": dict(tasks=[{"name": "mano", "params": {"L": 5}}], seq_len=256),
    "cpu_capo_512": dict(tasks=[{"name": "capo", "params": {"num_people": 1000}}], seq_len=512),
    "cpu_lano_512": dict(tasks=[{"name": "lano", "params": {"cfg": "cfg3b"}}], seq_len=512),  # cfg3b: <= 432+2
    "cpu_mix_1024": dict(tasks=[{"name": "depo1", "params": {"N": 100}}, {"name": "brevo1", "params": {"N": 40}},
                                {"name": "mano", "params": {"L": 8}}], seq_len=1024),
}


def preset(name: str, **overrides) -> DataConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown data preset {name!r}; valid presets: {sorted(PRESETS)}")
    d = dict(PRESETS[name])
    d.update(overrides)
    return DataConfig(**d)


class TaskMixtureMapDataset(grain.MapDataset):
    """Element j = sample j of a task chosen by weight from key(seed, split, j): ``{"tokens", "labels"}``."""

    def __init__(self, tasks: Sequence[base.Task], weights: Sequence[float], *, split: str, seed: int):
        super().__init__()
        if len(tasks) != len(weights) or not tasks:
            raise ValueError("need one weight per task and at least one task")
        w = np.asarray(weights, dtype=np.float64)
        self._cdf = (np.cumsum(w) / w.sum()).tolist()
        self._cdf[-1] = 1.0
        self._tasks = list(tasks)
        self._split, self._seed = split, int(seed)
        self._sid = split_id(split)

    def __len__(self):
        return STREAM_LENGTH

    def task_index(self, j: int) -> int:
        if len(self._tasks) == 1:
            return 0
        u = (mix_key(self._seed, self._sid, _MIX_TAG, j) >> 11) * (1.0 / (1 << 53))  # uniform in [0, 1)
        for t, c in enumerate(self._cdf):
            if u < c:
                return t
        return len(self._cdf) - 1

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        s = self._tasks[self.task_index(j)].sample(j, self._split, self._seed)
        return {"tokens": s.tokens, "labels": s.labels}

    def __str__(self):
        return f"TaskMixtureMapDataset({[t.name for t in self._tasks]}, split={self._split})"


def make_sample_dataset(cfg: DataConfig, *, split: str = "train", process_index: int = 0,
                        process_count: int = 1) -> grain.MapDataset:
    """Stages 1-3: the shuffled, process-sharded ``MapDataset`` of unpacked samples."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    vocab = cfg.vocabulary()
    ds: grain.MapDataset = TaskMixtureMapDataset(vocab.tasks, [t.weight for t in cfg.tasks], split=split,
                                                 seed=cfg.seed)
    if cfg.shuffle_buffer > 1:
        ds = grain.experimental.WindowShuffleMapDataset(ds, window_size=cfg.shuffle_buffer,
                                                        seed=mix_key(cfg.seed, 0x5F) & 0x7FFFFFFF)
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds


def make_dataset(cfg: DataConfig, *, split: str, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
    """The packed, batched grain dataset of this process.

    Batches are dicts of numpy arrays ``inputs``/``targets``/``segment_ids``/``positions`` int32
    ``[batch_size, seq_len]`` and ``loss_mask`` float32 ``[batch_size, seq_len]`` (see
    :mod:`canon_jax.data.packing`).  ``iter(ds)`` gives a grain iterator with ``get_state``/``set_state``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = make_sample_dataset(cfg, split=split, process_index=process_index, process_count=process_count)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if cfg.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; without absl.app nobody parses
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                               per_worker_buffer_size=cfg.worker_buffer_size))
    it_ds = PackIterDataset(it_ds, seq_len=cfg.seq_len, loss_on=cfg.loss_on, split_long=cfg.split_long)
    return it_ds.batch(batch_size, drop_remainder=True)
