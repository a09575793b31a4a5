"""The official "multi-token word" generator shared by Depo and Brevo2 (docs/tasks.md).

A word has a length uniform in [min_len, max_len]; each token is uniform in 1..mini_vocab and the *last* token is
shifted by +mini_vocab, so ids mini_vocab+1..2*mini_vocab mark word ends and a token stream splits into words
unambiguously.  Words here are tuples of those official word-token values (1..2*mini_vocab).
"""

from __future__ import annotations

from canon_jax.data.rng import Rng


def num_possible_words(mini_vocab: int, min_len: int, max_len: int) -> int:
    return sum(mini_vocab**l for l in range(min_len, max_len + 1))


def distinct_words(rng: Rng, n: int, mini_vocab: int, min_len: int, max_len: int) -> list[tuple[int, ...]]:
    """n distinct random words, in random order."""
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[int, ...]] = []
    rnd = rng.random
    span = max_len - min_len + 1
    while len(out) < n:
        length = min_len + int(rnd() * span)
        w = [1 + int(rnd() * mini_vocab) for _ in range(length)]
        w[-1] += mini_vocab
        t = tuple(w)
        if t not in seen:
            seen.add(t)
            out.append(t)
    rng.shuffle(out)
    return out


def split_words(values: list[int], mini_vocab: int) -> tuple[list[tuple[int, ...]], bool]:
    """Split word-token values (1..2*mini_vocab) at word ends. Returns (words, complete) where ``complete`` is False
    if the stream ends inside a word or holds a value outside 1..2*mini_vocab."""
    words, cur = [], []
    for v in values:
        if not 1 <= v <= 2 * mini_vocab:
            return words, False
        cur.append(v)
        if v > mini_vocab:
            words.append(tuple(cur))
            cur = []
    return words, not cur
