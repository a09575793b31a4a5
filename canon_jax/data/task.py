"""The task base class, the sample record and the special tokens every task shares.

Token ids. Every task writes its sequences in *local codes*: codes ``0..NUM_SPECIAL-1`` are the special tokens shared by
all tasks (:data:`PAD`, :data:`BOS`, …) and codes ``NUM_SPECIAL..NUM_SPECIAL+T-1`` are the task's own ``T`` tokens.
A task placed at vocabulary ``offset`` maps its own code ``NUM_SPECIAL + j`` to global id ``offset + j``; specials keep
their ids.  A stand-alone task has ``offset = NUM_SPECIAL`` (global id = local code); a task mix (see
:class:`canon_jax.data.vocab.Vocabulary`) places the tasks one after another, so a mix needs only
``NUM_SPECIAL + sum(T)`` embedding rows.  Each task also maps its codes to the official PhysicsLM4 ids
(:meth:`Task.to_official`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from canon_jax.data import rng as rng_lib

# Shared special tokens (global ids, identical in every task and every mix).
PAD = 0
BOS = 1
EOS = 2
ANSWER = 3  # answer marker: Depo 9500, Brevo 9998 (its own id, distinct from EOS; the official ids reuse 9998 for both)
QUERY = 4  # Brevo query marker 9997
SEP = 5  # Depo optional edge separator 9700
NUM_SPECIAL = 6
SPECIAL_NAMES = ("<pad>", "<bos>", "<eos>", "<ans>", "<query>", "<sep>")

SPLITS = ("train", "test")


@dataclasses.dataclass
class Sample:
    """One task sample.

    tokens: int32 ``[n]`` global token ids (starting with BOS).
    labels: int8 ``[n]``, 1 where the token belongs to the supervised answer (the loss is taken when *predicting* a
      token whose label is 1: target semantics, docs/tasks.md "Packing").
    meta: JSON-serialisable facts about the sample (problem size, answer, ...).
    """

    tokens: np.ndarray
    labels: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


class Task:
    """Base class. Subclasses set ``name``, ``DEFAULTS`` and implement ``_generate(i, split, rng) -> (codes, labels,
    meta)`` in local codes, ``num_task_tokens()`` and ``official_map()`` (np array: local code -> official id)."""

    name: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict] = {}
    RNG: ClassVar[type] = rng_lib.Rng  # per-sample random stream

    def __init__(self, offset: int | None = None, *, task_name: str | None = None, **params: Any):
        if task_name is not None:
            self.name = task_name  # preset name (depo1/depo2, brevo1/brevo2) used in keys and messages
        unknown = sorted(set(params) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for task {self.name!r}; valid parameters: {sorted(self.DEFAULTS)}"
            )
        merged = dict(self.DEFAULTS)
        for k, v in params.items():
            default = self.DEFAULTS[k]
            merged[k] = _coerce(self.name, k, v, default)
        self.params = merged
        self._validate()
        self.offset = NUM_SPECIAL if offset is None else int(offset)
        if self.offset < NUM_SPECIAL:
            raise ValueError(f"vocabulary offset must be >= {NUM_SPECIAL} (the special tokens), got {self.offset}")
        self._task_key = rng_lib.string_hash(self.name + "|" + repr(sorted(self.params.items())))
        self._key_prefix: dict = {}
        self._delta = self.offset - NUM_SPECIAL
        n_codes = NUM_SPECIAL + self.num_task_tokens()
        g = np.arange(n_codes, dtype=np.int64)
        g[NUM_SPECIAL:] += self.offset - NUM_SPECIAL
        self._to_global = g.astype(np.int32)
        self._from_global = {int(v): c for c, v in enumerate(g)}

    # -- to implement -------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        pass

    def num_task_tokens(self) -> int:
        raise NotImplementedError

    def official_map(self) -> np.ndarray:
        raise NotImplementedError

    def _generate(self, i: int, split: str, rng: rng_lib.Rng, seed: int = 0) -> tuple[list[int], list[int], dict]:
        raise NotImplementedError

    def code_name(self, code: int) -> str:
        """Human-readable name of a local code (for ``show``)."""
        return SPECIAL_NAMES[code] if code < NUM_SPECIAL else f"t{code - NUM_SPECIAL}"

    # -- public -------------------------------------------------------------------------------------------------
    @property
    def vocab_end(self) -> int:
        """One past the largest global id this task uses."""
        return self.offset + self.num_task_tokens()

    def key(self, i: int, split: str, seed: int) -> int:
        """64-bit key of sample ``i``; a pure function of (task, params, split, seed, i)."""
        if i < 0:
            raise ValueError(f"sample index must be >= 0, got {i}")
        prefix = self._key_prefix.get((seed, split))
        if prefix is None:  # cache the (seed, split, task) part of the key: only i is mixed per sample
            prefix = rng_lib.mix_key(seed, rng_lib.split_id(split), self._task_key)
            self._key_prefix[(seed, split)] = prefix
        return rng_lib.mix_key_continue(prefix, i)

    def sample(self, i: int, split: str = "train", seed: int = 0) -> Sample:
        """Sample ``i`` of the (infinite) ``split`` stream for ``seed``."""
        codes, labels, meta = self._generate(int(i), split, self.RNG(self.key(int(i), split, seed)), seed=seed)
        tokens = np.array(codes, dtype=np.int32)
        if self._delta:  # move the task's own codes to its block of the shared vocabulary
            tokens[tokens >= NUM_SPECIAL] += self._delta
        return Sample(tokens=tokens, labels=np.asarray(labels, dtype=np.int8), meta=meta)

    def sample_many(self, indices, split: str = "train", seed: int = 0) -> list[Sample]:
        """``[self.sample(i, split, seed) for i in indices]``; tasks with a vectorised generator override it."""
        return [self.sample(int(i), split, seed) for i in indices]

    def to_codes(self, tokens) -> np.ndarray:
        """Global ids -> local codes; ids outside this task's vocabulary become -1."""
        return np.asarray([self._from_global.get(int(t), -1) for t in np.asarray(tokens).reshape(-1)], dtype=np.int64)

    def to_official(self, tokens) -> list[int]:
        """Global ids -> official PhysicsLM4 ids (errors on ids outside the task's vocabulary)."""
        codes = self.to_codes(tokens)
        if (codes < 0).any():
            bad = np.asarray(tokens).reshape(-1)[codes < 0][:5].tolist()
            raise ValueError(f"token ids {bad} are not in task {self.name!r}'s vocabulary")
        return self.official_map()[codes].astype(np.int64).tolist()

    def decode(self, tokens) -> list[str]:
        return [
            self.code_name(int(c)) if c >= 0 else f"?{int(t)}"
            for c, t in zip(self.to_codes(tokens), np.asarray(tokens).reshape(-1))
        ]

    def show(self, sample: Sample) -> str:
        """Human-readable rendering of a sample (overridden per task)."""
        return " ".join(self.decode(sample.tokens))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params.items())}, offset={self.offset})"


def _coerce(task: str, key: str, value: Any, default: Any) -> Any:
    """Convert CLI strings / YAML values to the type of the default; errors name the field."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes"):
                    return True
                if value.lower() in ("0", "false", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"task {task!r}: parameter {key!r} expects {type(default).__name__}, got {value!r}") from None
    return value
