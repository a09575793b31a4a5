"""The grain input pipeline: task mixture -> shuffle -> process shard -> (worker processes) -> packing -> batches.

    ds = make_dataset(DataConfig(tasks=[TaskSpec("depo1", params={"N": 50})], seq_len=512), split="train",
                      batch_size=8)
    it = iter(ds); batch = next(it)          # dict of numpy arrays [8, 512]
    state = it.get_state(); ...; it.set_state(state)   # exact resume

Stages and why they are ordered this way:

1. :class:`TaskMixtureMapDataset` — an (effectively infinite, 2**62 long, or ``num_samples`` long) ``MapDataset``:
   element ``j`` picks a task with probability ∝ its weight from a key of (seed, split, j) and is that task's sample
   ``j``; a pure function of ``j``, so every stage below can address it.
2. :class:`WindowPermuteMapDataset` — shuffles indices inside windows of ``shuffle_buffer`` (the iid tasks do not
   need it; Capo's per-person exposures and any finite-index logic do).
3. ``slice(process_index::process_count)`` — each JAX process reads only its own shard.
4. chunks of ``read_chunk`` consecutive elements of that shard, each read with one ``_getitems`` call (the window
   permutation and grain's slice pass it down to the mixture, which generates each task's part at once: vectorised
   for Mano), then
   ``to_iter_dataset`` + optional ``mp_prefetch`` — worker processes generate whole chunks; grain slices the chunk
   index space ``worker::num_workers`` and interleaves round-robin, so the sample order does not depend on
   ``num_workers``; the chunks are flattened again in the main process.
5. :class:`~canon_jax.data.packing.PackIterDataset` — runs in the main process *after* the workers (packing is
   stateful: done per worker it would make the windows depend on the worker count).
6. ``batch(batch_size, drop_remainder=True)`` (finite streams, ``num_samples``: the last batch is filled with empty
   windows instead).

The iterator state (``get_state``/``set_state``) is grain's: parent positions (the start of the current chunk and how
many of its samples were used; restoring re-reads that chunk) plus, by value, the packer's pending sample.
With workers, scripts must guard their entry point with ``if __name__ == "__main__":``; absl flags are marked parsed
here if nobody parsed them (grain's workers read them).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

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
    num_samples: None = the infinite stream; an int = only samples ``0..num_samples-1`` of the mixture (split over
      the processes), after which the iterator ends; the last batch is filled with all-padding windows (loss_mask 0)
      so that no sample is dropped.  For a single Capo task, ``num_samples = num_people * exposures``
      (:meth:`DataConfig.capo_num_samples`) shows every person exactly ``exposures`` times.
    read_chunk: consecutive elements of this process's (shuffled, sharded) sample stream read together — by one worker,
      in one call, so vectorised tasks (Mano) generate exactly the samples this consumer needs.  It does not change
      the batches (only how they are computed).
    """

    tasks: list = dataclasses.field(default_factory=lambda: [TaskSpec("depo1")])
    seq_len: int = 4096
    loss_on: str = "answer"
    seed: int = 0
    shuffle_buffer: int = 4096
    num_workers: int = 0
    worker_buffer_size: int = 16
    split_long: bool = False
    num_samples: int | None = None
    read_chunk: int = 1024

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
        if isinstance(self.read_chunk, bool) or int(self.read_chunk) < 1:
            raise ValueError(f"DataConfig.read_chunk must be >= 1, got {self.read_chunk!r}")
        if self.num_samples is not None and (isinstance(self.num_samples, bool) or int(self.num_samples) < 1):
            raise ValueError(f"DataConfig.num_samples must be None (infinite) or >= 1, got {self.num_samples!r}")

    def capo_num_samples(self) -> int:
        """``num_people * exposures`` of a single-task Capo config (the samples of exactly ``exposures`` passes)."""
        if len(self.tasks) != 1 or self.tasks[0].name != "capo":
            raise ValueError(
                "capo_num_samples needs a config whose only task is capo (in a mix the mixture decides "
                "which stream indices Capo gets, so exposures are only balanced on average)"
            )
        return self.vocabulary().tasks[0].num_train_samples

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
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
    "cpu_mix_1024": dict(
        tasks=[
            {"name": "depo1", "params": {"N": 100}},
            {"name": "brevo1", "params": {"N": 40}},
            {"name": "mano", "params": {"L": 8}},
        ],
        seq_len=1024,
    ),
}


def preset(name: str, **overrides) -> DataConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown data preset {name!r}; valid presets: {sorted(PRESETS)}")
    d = dict(PRESETS[name])
    d.update(overrides)
    return DataConfig(**d)


class WindowPermuteMapDataset(grain.MapDataset):
    """Element j = parent[start + π_w(j - start)] for the window w = j // window of ``[start, start + size)``, π_w a
    seeded permutation; the last window may be shorter (it is permuted within itself, unlike grain's
    ``WindowShuffleMapDataset``, which wraps a partial last window around to earlier elements)."""

    def __init__(self, parent: grain.MapDataset, *, window_size: int, seed: int):
        super().__init__(parent)
        self._window, self._seed, self._n = int(window_size), int(seed), len(parent)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self):
        return self._n

    def _perm(self, w: int) -> np.ndarray:
        p = self._perms.get(w)
        if p is None:
            size = min(self._window, self._n - w * self._window)
            p = np.random.default_rng(mix_key(self._seed, 0x5F5F, w)).permutation(size)
            self._perms[w] = p
            while len(self._perms) > 4:
                self._perms.pop(next(iter(self._perms)))
        return p

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        if not 0 <= j < self._n:
            raise IndexError(f"index {j} out of range for length {self._n}")
        w, r = divmod(j, self._window)
        return self._parent[w * self._window + int(self._perm(w)[r])]

    def _getitems(self, indices):
        parent_idx = []
        for j in indices:
            if not 0 <= j < self._n:
                raise IndexError(f"index {j} out of range for length {self._n}")
            w, r = divmod(int(j), self._window)
            parent_idx.append(w * self._window + int(self._perm(w)[r]))
        return self._parent._getitems(parent_idx)

    def __str__(self):
        return f"WindowPermuteMapDataset(window_size={self._window})"


class TaskMixtureMapDataset(grain.MapDataset):
    """Element j = sample j of a task chosen by weight from key(seed, split, j): ``{"tokens", "labels"}``."""

    def __init__(
        self, tasks: Sequence[base.Task], weights: Sequence[float], *, split: str, seed: int, length: int | None = None
    ):
        super().__init__()
        self._length = STREAM_LENGTH if length is None else int(length)
        if len(tasks) != len(weights) or not tasks:
            raise ValueError("need one weight per task and at least one task")
        w = np.asarray(weights, dtype=np.float64)
        self._cdf = (np.cumsum(w) / w.sum()).tolist()
        self._cdf[-1] = 1.0
        self._tasks = list(tasks)
        self._split, self._seed = split, int(seed)
        self._sid = split_id(split)

    def __len__(self):
        return self._length

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
        if not 0 <= j < self._length:
            raise IndexError(f"sample index {j} out of range for a stream of {self._length}")
        s = self._tasks[self.task_index(j)].sample(j, self._split, self._seed)
        return {"tokens": s.tokens, "labels": s.labels}

    def _getitems(self, indices):
        """Elements ``indices`` at once: grouped by task and generated with ``Task.sample_many`` (vectorised for
        Mano); equal to ``[self[j] for j in indices]``."""
        indices = [int(j) for j in indices]
        for j in indices:
            if not 0 <= j < self._length:
                raise IndexError(f"sample index {j} out of range for a stream of {self._length}")
        groups: dict[int, list[int]] = {}
        for pos, j in enumerate(indices):
            groups.setdefault(self.task_index(j), []).append(pos)
        out: list = [None] * len(indices)
        for t, positions in groups.items():
            samples = self._tasks[t].sample_many([indices[p] for p in positions], self._split, self._seed)
            for p, smp in zip(positions, samples):
                out[p] = {"tokens": smp.tokens, "labels": smp.labels}
        return out

    def __str__(self):
        return f"TaskMixtureMapDataset({[t.name for t in self._tasks]}, split={self._split})"


def task_dataset(task: base.Task, split: str = "train", seed: int = 0) -> TaskMixtureMapDataset:
    """One task's infinite stream as a grain ``MapDataset``: element i = ``{"tokens", "labels"}`` of sample i."""
    return TaskMixtureMapDataset([task], [1.0], split=split, seed=seed)


class _ChunkMapDataset(grain.MapDataset):
    """Element k = the list of parent elements ``[k*chunk, (k+1)*chunk)``, fetched with one ``_getitems`` call (grain's
    shuffle and slice datasets pass it down, so the mixture generates the whole chunk at once)."""

    def __init__(self, parent: grain.MapDataset, chunk: int):
        super().__init__(parent)
        self._chunk, self._n = int(chunk), len(parent)

    def __len__(self):
        return -(-self._n // self._chunk)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        start = k * self._chunk
        return list(self._parent._getitems(range(start, min(start + self._chunk, self._n))))

    def __str__(self):
        return f"_ChunkMapDataset(chunk={self._chunk})"


class _UnchunkIterDataset(grain.IterDataset):
    """Flattens a stream of lists back into their elements (inverse of :class:`_ChunkMapDataset`)."""

    def __iter__(self):
        return _UnchunkIterator(self._parent.__iter__())


class _UnchunkIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)
        self._chunk: list = []  # the current chunk
        self._pos = 0  # elements of it already returned
        self._before = self._parent.get_state()  # parent state before the current chunk was read

    def __next__(self):
        while self._pos >= len(self._chunk):
            before = self._parent.get_state()
            self._chunk, self._pos = list(next(self._parent)), 0
            self._before = before
        self._pos += 1
        return self._chunk[self._pos - 1]

    def get_state(self):
        # compact: where the current chunk starts and how much of it was used; set_state re-reads that chunk
        return {"parent": self._before, "consumed": self._pos}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._before, self._chunk, self._pos = state["parent"], [], 0
        if state["consumed"]:
            self._chunk, self._pos = list(next(self._parent)), int(state["consumed"])


def make_sample_dataset(
    cfg: DataConfig, *, split: str = "train", process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
    """Stages 1-3: the shuffled, process-sharded ``MapDataset`` of unpacked samples."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    vocab = cfg.vocabulary()
    ds: grain.MapDataset = TaskMixtureMapDataset(
        vocab.tasks, [t.weight for t in cfg.tasks], split=split, seed=cfg.seed, length=cfg.num_samples
    )
    if cfg.shuffle_buffer > 1:
        # our own window permutation: one cached numpy permutation per window (grain's WindowShuffleMapDataset
        # computes a keyed bijection per element, ~50 us each, and wraps a partial last window around)
        ds = WindowPermuteMapDataset(ds, window_size=cfg.shuffle_buffer, seed=mix_key(cfg.seed, 0x5F))
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds


def make_dataset(
    cfg: DataConfig, *, split: str, batch_size: int, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
    """The packed, batched grain dataset of this process.

    Batches are dicts of numpy arrays ``inputs``/``targets``/``segment_ids``/``positions`` int32
    ``[batch_size, seq_len]`` and ``loss_mask`` float32 ``[batch_size, seq_len]`` (see
    :mod:`canon_jax.data.packing`).  ``iter(ds)`` gives a grain iterator with ``get_state``/``set_state``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = make_sample_dataset(cfg, split=split, process_index=process_index, process_count=process_count)
    # chunks of read_chunk consecutive stream elements travel together (one _getitems call, one worker)
    it_ds = _ChunkMapDataset(ds, cfg.read_chunk).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    )
    if cfg.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; without absl.app nobody parses
            flags.FLAGS.mark_as_parsed()
        # worker_buffer_size counts samples; the workers' elements are chunks of read_chunk samples
        per_worker = max(1, -(-cfg.worker_buffer_size // cfg.read_chunk))
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.num_workers, per_worker_buffer_size=per_worker)
        )
    it_ds = PackIterDataset(
        _UnchunkIterDataset(it_ds), seq_len=cfg.seq_len, loss_on=cfg.loss_on, split_long=cfg.split_long
    )
    if cfg.num_samples is None:
        return it_ds.batch(batch_size, drop_remainder=True)
    # finite stream: keep the last partial batch, filled with all-padding windows so every batch has one shape
    return it_ds.batch(batch_size, drop_remainder=False).map(functools.partial(_fill_batch, batch_size=batch_size))


def _fill_batch(batch: dict, *, batch_size: int) -> dict:
    """Pads a short final batch with empty windows (PAD tokens, segment 0, loss_mask 0)."""
    n = batch["inputs"].shape[0]
    if n == batch_size:
        return batch
    return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
