"""Batching helpers shared by the task evaluators.

Models are passed as plain functions:

* ``logits_fn(tokens: int32 [B, L]) -> [B, L, V]`` — teacher-forced next-token logits (row t predicts token t+1).
  Sequences are right-padded with PAD; causal models are unaffected by padding on the right.
* ``generate_fn(prompts: int32 [B, P], prompt_mask: bool [B, P], max_new_tokens: int, rng) -> int32 [B, N]`` —
  continuation of left-padded prompts (``prompt_mask`` False on the padding), ``rng`` a ``jax.random`` key.

Every call uses the same ``[batch_size, L]`` shape (short batches are filled with copies of their first row and the
extra rows ignored) so that a jitted model compiles once per evaluation.

Malformed model outputs never crash an evaluation: logits of the wrong shape or a non-numeric type, generations of
the wrong shape or dtype, NaNs and out-of-vocabulary ids are scored wrong (a ``RuntimeWarning`` names the shape
problem, so a mis-wired model is not silently scored zero).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

from canon_jax.data.base import PAD
from pallas_kernels.common import round_up

LogitsFn = Callable[[np.ndarray], np.ndarray]
GenerateFn = Callable[..., np.ndarray]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def teacher_forced(
    logits_fn: LogitsFn, seqs: Sequence[np.ndarray], batch_size: int, *, logprobs: bool = False
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """For each sequence s (length n): ``argmax [n]`` (row t = the model's greedy guess of s[t+1]) and, if
    ``logprobs``, ``logp [n-1]`` float64 with logp[t] = log p(s[t+1] | s[:t+1])."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not seqs:
        return []
    length = round_up(max(1, *(len(s) for s in seqs)), 8)  # a multiple of 8: fewer distinct shapes to compile
    out = []
    for b0 in range(0, len(seqs), batch_size):
        chunk = list(seqs[b0 : b0 + batch_size])
        x = np.full((batch_size, length), PAD, np.int32)
        for r in range(batch_size):
            s = chunk[r] if r < len(chunk) else chunk[0]
            x[r, : len(s)] = s
        logits = _as_logits(logits_fn(x), (batch_size, length))
        if logits is None:  # malformed: every row of this batch is scored wrong
            for s in chunk:
                out.append((np.full(len(s), -1, np.int64), np.full(len(s) - 1, -np.inf) if logprobs else None))
            continue
        am = np.argmax(logits, axis=-1)
        for r, s in enumerate(chunk):
            n = len(s)
            lp = None
            if logprobs:
                ls = _log_softmax(logits[r, : n - 1])
                tgt = np.asarray(s[1:], dtype=np.int64)
                ok = (tgt >= 0) & (tgt < ls.shape[-1])
                lp = np.full(n - 1, -np.inf)
                lp[ok] = ls[np.nonzero(ok)[0], tgt[ok]]
                lp = np.where(np.isnan(lp), -np.inf, lp)
            out.append((am[r, :n], lp))
    return out


def _as_logits(y, lead_shape: tuple[int, int]) -> np.ndarray | None:
    """``y`` as a float array ``[*lead_shape, V]`` (V >= 1), or None (with a warning) if it is not one."""
    try:
        arr = np.asarray(y)
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"dtype {arr.dtype}")
        arr = arr.astype(np.float64, copy=False) if arr.dtype.kind != "f" else arr
    except (TypeError, ValueError) as e:
        warnings.warn(
            f"logits_fn returned a non-numeric output ({e}); the batch is scored wrong", RuntimeWarning, stacklevel=3
        )
        return None
    if arr.ndim != 3 or arr.shape[:2] != tuple(lead_shape) or arr.shape[2] < 1:
        warnings.warn(
            f"logits_fn returned shape {arr.shape}; expected [{lead_shape[0]}, {lead_shape[1]}, vocab]: "
            f"the batch is scored wrong",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return arr


def generate(
    generate_fn: GenerateFn, prompts: Sequence[np.ndarray], batch_size: int, max_new_tokens: int, seed: int
) -> list[np.ndarray]:
    """Left-pads ``prompts`` to one length and returns each prompt's generated tokens ``[max_new_tokens]`` (rows of a
    malformed model output — wrong width or non-integer — are replaced by -1, i.e. scored wrong)."""
    import jax  # only needed for the rng handed to the model

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if not prompts:
        return []
    length = max(len(p) for p in prompts)
    key = jax.random.PRNGKey(seed)
    out = []
    for bi, b0 in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[b0 : b0 + batch_size])
        x = np.full((batch_size, length), PAD, np.int32)
        mask = np.zeros((batch_size, length), bool)
        for r in range(batch_size):
            p = chunk[r] if r < len(chunk) else chunk[0]
            x[r, length - len(p) :] = p
            mask[r, length - len(p) :] = True
        try:
            y = np.asarray(generate_fn(x, mask, max_new_tokens, jax.random.fold_in(key, bi)))
        except (TypeError, ValueError):  # e.g. ragged rows: not an array at all
            y = np.zeros(0)
        if y.ndim != 2 or y.shape != (batch_size, max_new_tokens):
            warnings.warn(
                f"generate_fn returned shape {y.shape}; expected [{batch_size}, {max_new_tokens}]: the "
                f"batch is scored wrong",
                RuntimeWarning,
                stacklevel=2,
            )
        for r in range(len(chunk)):
            row = y[r] if (y.ndim == 2 and y.shape[0] == batch_size) else np.zeros(0)
            if not np.issubdtype(row.dtype, np.integer) or row.shape != (max_new_tokens,):
                row = np.full(max_new_tokens, -1, np.int64)
            out.append(row.astype(np.int64))
    return out


def mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")
