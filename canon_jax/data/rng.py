"""Counter-based randomness for the synthetic tasks.

Every sample is a pure function of ``(task, params, split, seed, index)``: the generator derives a 64-bit key from
those integers with a fixed integer mix (splitmix64 finaliser) and seeds a private RNG with it.  Nothing depends on
process, worker or call order, so sample ``i`` is identical on every machine and under any sharding.

Two RNG flavours are offered:

* :class:`Rng` wraps :class:`random.Random` and only uses ``random()`` (the one method whose stream CPython
  guarantees across versions); it is the cheap choice for the small per-sample draws of Depo/Brevo/Mano/Capo.
* :func:`numpy_rng` returns a :class:`numpy.random.Generator` for code that wants one (the Lano grammar sampler).
"""
from __future__ import annotations

import math
import random
import zlib
from typing import MutableSequence, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

_MASK64 = (1 << 64) - 1

SPLIT_IDS = {"train": 1, "test": 2}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_key(*parts: int) -> int:
    """A 64-bit key that depends on every (non-negative or negative) integer in ``parts`` and on their order."""
    h = 0x6A09E667F3BCC908
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h


def mix_key_continue(key: int, *parts: int) -> int:
    """``mix_key(*a, *b) == mix_key_continue(mix_key(*a), *b)``: extend a key with more parts."""
    h = key
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h


def string_hash(s: str) -> int:
    """Stable (process-independent, unlike ``hash``) 32-bit hash of a string."""
    return zlib.crc32(s.encode("utf-8"))


def split_id(split: str) -> int:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; valid splits: {sorted(SPLIT_IDS)}")
    return SPLIT_IDS[split]


class Rng:
    """Small helper over ``random.Random`` that draws everything from ``random()`` (version-stable stream)."""

    __slots__ = ("_r", "random")

    def __init__(self, key: int):
        self._r = random.Random(key)
        self.random = self._r.random

    def below(self, n: int) -> int:
        """Uniform integer in [0, n)."""
        return int(self.random() * n)

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] (inclusive, like ``random.randint``)."""
        return lo + int(self.random() * (hi - lo + 1))

    def choice(self, seq: Sequence[T]) -> T:
        return seq[int(self.random() * len(seq))]

    def shuffle(self, x: MutableSequence) -> None:
        """In-place Fisher-Yates shuffle."""
        rnd = self.random
        for i in range(len(x) - 1, 0, -1):
            j = int(rnd() * (i + 1))
            x[i], x[j] = x[j], x[i]

    def permutation(self, n: int) -> list[int]:
        p = list(range(n))
        self.shuffle(p)
        return p

    def sample(self, population: Sequence[T], k: int) -> list[T]:
        """k distinct elements in random order (partial Fisher-Yates on a copy)."""
        pool = list(population)
        n = len(pool)
        if k > n:
            raise ValueError(f"cannot sample {k} distinct elements from {n}")
        rnd = self.random
        for i in range(k):
            j = i + int(rnd() * (n - i))
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


def numpy_rng(key: int) -> np.random.Generator:
    return np.random.default_rng(key)


class HarmonicN:
    """Sampler of the problem size n in {3..N} with P(n) ∝ 1/(n + sqrt(N)) (the official Depo/Brevo train law)."""

    def __init__(self, N: int, lo: int = 3):
        self.N = N
        self.lo = lo
        self.values = list(range(lo, N + 1))
        w = [1.0 / (n + math.sqrt(N)) for n in self.values]
        total = sum(w)
        self.probs = [x / total for x in w]
        acc, cdf = 0.0, []
        for p in self.probs:
            acc += p
            cdf.append(acc)
        cdf[-1] = 1.0
        self._cdf = cdf

    def __call__(self, rng: Rng) -> int:
        import bisect

        return self.values[bisect.bisect_right(self._cdf, rng.random())] if self.values else self.lo
