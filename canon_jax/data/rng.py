"""Counter-based randomness for the synthetic tasks.

Every sample is a pure function of ``(task, params, split, seed, index)``: the generator derives a 64-bit key from
those integers with a fixed integer mix (splitmix64 finaliser) and seeds a private RNG with it.  Nothing depends on
process, worker or call order, so sample ``i`` is identical on every machine and under any sharding.

Three RNG flavours are offered:

* :class:`Rng` wraps :class:`random.Random` and only uses ``random()`` (the one method whose stream CPython
  guarantees across versions); it is the cheap choice for the small per-sample draws of Depo/Brevo/Capo.
* :class:`SplitMixRng` is counter-based: its j-th ``random()`` is a fixed integer function of (key, j)
  (:func:`splitmix_uniform`), so the draws of many samples can also be computed at once with numpy
  (:func:`splitmix_uniform_np`) — bit-identical to the scalar stream.  Mano uses it for vectorised generation.
* :func:`numpy_rng` returns a :class:`numpy.random.Generator` for code that wants one (the Lano grammar sampler).
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import MutableSequence, Sequence
from typing import TypeVar

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


_GAMMA = 0x9E3779B97F4A7C15
_INV53 = 1.0 / (1 << 53)


def splitmix_uniform(key: int, j: int) -> float:
    """Draw ``j`` of the SplitMix64 stream seeded with ``key``, as a float in [0, 1) with 53 random bits."""
    return (_splitmix64((key + j * _GAMMA) & _MASK64) >> 11) * _INV53


def splitmix64_np(x: np.ndarray) -> np.ndarray:
    """Vectorised :func:`_splitmix64` on uint64 arrays (wrap-around arithmetic, identical bits)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GAMMA)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def mix_keys_np(prefix: int, indices: np.ndarray) -> np.ndarray:
    """``[mix_key_continue(prefix, i) for i in indices]`` as a uint64 array (indices must be >= 0)."""
    return splitmix64_np(np.uint64(prefix) ^ np.asarray(indices, dtype=np.uint64))


def splitmix_uniform_np(keys: np.ndarray, num_draws: int) -> np.ndarray:
    """``u[b, j] = splitmix_uniform(keys[b], j)`` for j < num_draws: float64 ``[len(keys), num_draws]``.

    IEEE-754 double arithmetic on values exactly representable (53-bit integers times 2**-53), so the result is
    bit-identical to the scalar function on every machine.
    """
    with np.errstate(over="ignore"):
        steps = np.arange(num_draws, dtype=np.uint64) * np.uint64(_GAMMA)
        x = splitmix64_np(np.asarray(keys, dtype=np.uint64)[:, None] + steps[None, :])
    return (x >> np.uint64(11)).astype(np.float64) * _INV53


class SplitMixRng(Rng):
    """Counter-based stream: the j-th call of ``random()`` returns ``splitmix_uniform(key, j)``."""

    __slots__ = ("_key", "_j")

    def __init__(self, key: int):
        self._key = key & _MASK64
        self._j = 0
        self.random = self._next

    def _next(self) -> float:
        j = self._j
        self._j = j + 1
        return (_splitmix64((self._key + j * _GAMMA) & _MASK64) >> 11) * _INV53


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
