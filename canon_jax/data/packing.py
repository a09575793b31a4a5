"""Packing variable-length samples into fixed training windows.

A window holds whole samples back to back (greedy, in stream order); a sample that does not fit in the rest of the
current window starts the next one and the rest is padded, so no sample is dropped, duplicated or reordered and the
packing does not bias which samples are seen (a sampler that skipped non-fitting samples would under-represent long
ones).  Output per window (``L = seq_len``):

* ``inputs``      int32 ``[L]``   tokens (PAD=0 after the last sample)
* ``targets``     int32 ``[L]``   ``inputs[t+1]`` (PAD at t = L-1): the next token
* ``loss_mask``   float32 ``[L]`` target semantics: 1 iff ``targets[t]`` is supervised, i.e. tokens t and
  t+1 belong to the same sample and (``loss_on="answer"``) token t+1's label is 1 / (``loss_on="all"``) always
* ``segment_ids`` int32 ``[L]``   samples numbered 1, 2, … within the window; 0 = padding
* ``positions``   int32 ``[L]``   position inside the sample (continues across pieces of a split sample)

A sample longer than ``L`` is an error unless ``split_long=True``, which cuts it into ``L``-token pieces (each its own
segment; the first token of a later piece is then never a target, so that one supervised token per cut is lost).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import grain
import numpy as np

LOSS_ON = ("answer", "all")


class SampleTooLongError(ValueError):
    pass


def _check_loss_on(loss_on: str) -> None:
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")


def build_window(pieces: Sequence[tuple[np.ndarray, np.ndarray, int]], seq_len: int, loss_on: str) -> dict:
    """One packed window from ``pieces`` = [(tokens [n], labels [n], first_position)], sum(n) <= seq_len."""
    inputs = np.zeros(seq_len, np.int32)
    labels = np.zeros(seq_len + 1, np.int8)
    seg = np.zeros(seq_len + 1, np.int32)
    pos = np.zeros(seq_len, np.int32)
    t = 0
    for j, (tok, lab, p0) in enumerate(pieces):
        n = len(tok)
        if t + n > seq_len:
            raise ValueError(f"pieces of total length {t + n} exceed the window ({seq_len})")
        inputs[t : t + n] = tok
        labels[t : t + n] = lab
        seg[t : t + n] = j + 1
        pos[t : t + n] = np.arange(p0, p0 + n)
        t += n
    targets = np.zeros(seq_len, np.int32)
    targets[:-1] = inputs[1:]
    same = (seg[:-1] > 0) & (seg[1:] == seg[:-1])
    mask = same & (labels[1:] == 1) if loss_on == "answer" else same
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": mask.astype(np.float32),
        "segment_ids": seg[:-1].copy(),
        "positions": pos,
    }


def _pieces_of(tokens: np.ndarray, labels: np.ndarray, seq_len: int, split_long: bool) -> list:
    n = len(tokens)
    if n <= seq_len:
        return [(tokens, labels, 0)]
    if not split_long:
        raise SampleTooLongError(
            f"a sample of length {n} does not fit the packing window of length {seq_len}; use a longer seq_len or "
            f"split_long=True to cut long samples into windows"
        )
    return [(tokens[s : s + seq_len], labels[s : s + seq_len], s) for s in range(0, n, seq_len)]


def pack_samples(samples: Iterable[Any], seq_len: int, loss_on: str = "answer", split_long: bool = False) -> list[dict]:
    """Greedy in-order packing of a finite list of samples (``Sample``s or dicts with tokens/labels)."""
    _check_loss_on(loss_on)
    windows, cur, used = [], [], 0
    for s in samples:
        tok, lab = (s["tokens"], s["labels"]) if isinstance(s, dict) else (s.tokens, s.labels)
        for piece in _pieces_of(np.asarray(tok), np.asarray(lab), seq_len, split_long):
            if used + len(piece[0]) > seq_len:
                windows.append(build_window(cur, seq_len, loss_on))
                cur, used = [], 0
            cur.append(piece)
            used += len(piece[0])
    if cur:
        windows.append(build_window(cur, seq_len, loss_on))
    return windows


class PackIterDataset(grain.IterDataset):
    """grain ``IterDataset`` packing a stream of ``{"tokens", "labels"}`` dicts into windows (see module doc)."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, loss_on: str = "answer", split_long: bool = False):
        super().__init__(parent)
        _check_loss_on(loss_on)
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self._seq_len, self._loss_on, self._split_long = seq_len, loss_on, split_long

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._loss_on, self._split_long)

    def __str__(self):
        return f"PackIterDataset(seq_len={self._seq_len}, loss_on={self._loss_on})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent, seq_len, loss_on, split_long):
        super().__init__(parent)
        self._seq_len, self._loss_on, self._split_long = seq_len, loss_on, split_long
        # pieces read from the parent but not yet emitted (they start the next window)
        self._pending: list[tuple[np.ndarray, np.ndarray, int]] = []

    def __next__(self):
        cur, used = [], 0
        while True:
            if not self._pending:
                try:
                    s = next(self._parent)
                except StopIteration:
                    if cur:
                        break
                    raise
                self._pending = _pieces_of(
                    np.asarray(s["tokens"]), np.asarray(s["labels"]), self._seq_len, self._split_long
                )
            piece = self._pending[0]
            if used + len(piece[0]) > self._seq_len:
                break
            cur.append(self._pending.pop(0))
            used += len(piece[0])
        return build_window(cur, self._seq_len, self._loss_on)

    def get_state(self):
        # pending pieces are stored by value (at most one sample, <= a window or a split long sample)
        return {
            "parent": self._parent.get_state(),
            "pending": [[p[0].tolist(), p[1].tolist(), int(p[2])] for p in self._pending],
        }

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._pending = [(np.asarray(t, np.int32), np.asarray(l, np.int8), int(p0)) for t, l, p0 in state["pending"]]
