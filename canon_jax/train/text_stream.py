"""Streamed real-text input: a pre-tokenised token directory -> packed ``seq_len`` windows -> per-process batches.

Windows: the corpus (:class:`~canon_jax.data.shards.TokenShards`, the shards concatenated) is cut into
``n = (num_tokens - 1) // L`` windows; window ``w`` is tokens ``[w*L, w*L + L + 1)`` (``inputs = w[:-1]``,
``targets = w[1:]``), so every next-token transition is trained once per epoch, as the in-memory reader
(:mod:`canon_jax.train.text_data`) does. With ``document_boundaries`` the window's ``segment_ids`` number its
documents from 1 and ``positions`` count within each document (used by segment-aware models); without, a window
is one segment with positions ``0..L-1``.

Order: global element ``g`` (``g = 0, 1, ...`` over all processes) is window ``perm_e(g mod n)`` of epoch
``e = g // n``, ``perm_e`` a keyed bijection (grain's ``index_shuffle``: O(1) memory, no permutation table), or the
identity without shuffling. Global batch ``s`` is elements ``[s*B, (s+1)*B)`` (``B`` = global batch size) and
process ``p`` of ``P`` reads rows ``[p*B/P, (p+1)*B/P)`` of it: no window is read by two hosts, and the global
batch sequence does not depend on ``P``.

State: the dataset is a grain ``MapDataset`` whose element ``s`` is this process's share of global batch ``s``; its
iterator state is ``{"next_index": s}`` -- the same on every process, saved with each checkpoint by the trainer
(grain checkpoint handler), and valid for any process count at the same global batch size, so a run resumes at
exactly the next batch, also with a different number of hosts. Memory: windows are read with positional file reads;
nothing of the corpus is loaded.
"""

from __future__ import annotations

import grain
import numpy as np

from canon_jax.data.shards import TokenShards

__all__ = ["TokenWindows", "GlobalBatchMapDataset", "make_token_dataset", "split_windows"]

_INFINITE = 1 << 62


class TokenWindows:
    """Windows ``[first, first + count)`` of a token directory, each ``seq_len + 1`` tokens (next-token pairs)."""

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        first: int = 0,
        count: int | None = None,
        document_boundaries: bool = True,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.shards, self.seq_len = shards, int(seq_len)
        total = max((shards.num_tokens - 1) // self.seq_len, 0)
        count = total - first if count is None else count
        if first < 0 or count < 0 or first + count > total:
            raise ValueError(f"windows [{first}, {first + count}) outside the {total} windows of the corpus")
        self.first, self.count = int(first), int(count)
        self.document_boundaries = bool(document_boundaries)

    def __len__(self):
        return self.count

    def example(self, w: int) -> dict:
        """Window ``w`` (0-based within this split) as ``inputs/targets/loss_mask/segment_ids/positions [L]``."""
        L = self.seq_len
        lo = (self.first + int(w)) * L
        toks = self.shards.read(lo, L + 1).astype(np.int32)
        if self.document_boundaries:
            starts = np.unique(self.shards.document_starts(lo, lo + L))
            mark = np.zeros(L, np.int32)
            mark[starts[1:] - lo] = 1  # starts[0] <= lo holds the window's first token
            seg = 1 + np.cumsum(mark, dtype=np.int32)
            pos = (lo + np.arange(L, dtype=np.int64) - starts[seg - 1]).astype(np.int32)
        else:
            seg = np.ones(L, np.int32)
            pos = np.arange(L, dtype=np.int32)
        return {
            "inputs": toks[:-1],
            "targets": toks[1:],
            "loss_mask": np.ones(L, np.float32),
            "segment_ids": seg,
            "positions": pos,
        }


class GlobalBatchMapDataset(grain.MapDataset):
    """Element ``s`` = process ``process_index``'s rows of global batch ``s`` (dict of ``[local_batch, L]`` arrays)."""

    def __init__(
        self,
        windows: TokenWindows,
        *,
        local_batch: int,
        process_index: int,
        process_count: int,
        shuffle: bool,
        seed: int,
        repeat: bool,
    ):
        super().__init__()
        if not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
        if local_batch < 1:
            raise ValueError(f"batch_size must be >= 1, got {local_batch}")
        self._w, self._lb, self._p, self._pc = windows, int(local_batch), int(process_index), int(process_count)
        self._global = self._lb * self._pc
        self._shuffle, self._seed, self._repeat = bool(shuffle), int(seed) % (1 << 32), bool(repeat)
        n = len(windows)
        if n < self._global:
            raise ValueError(
                f"{n} windows of seq_len {windows.seq_len} are fewer than one global batch "
                f"({process_count} x {local_batch}); add text or lower data.seq_len"
            )
        if shuffle and n - 1 >= 1 << 32:
            raise ValueError(f"{n} windows: the keyed shuffle handles at most 2**32; raise data.seq_len")
        self._len = _INFINITE if repeat else n // self._global

    def __len__(self):
        return self._len

    def window_of(self, g: int) -> int:
        """The window (within the split) of global element ``g``."""
        n = len(self._w)
        epoch, r = divmod(int(g), n)
        if not self._shuffle or n == 1:
            return r
        return int(
            grain.experimental.index_shuffle(r, max_index=n - 1, seed=(self._seed + epoch) % (1 << 32), rounds=4)
        )

    def __getitem__(self, s):
        if isinstance(s, slice):
            return self.slice(s)
        if not 0 <= s < self._len:
            raise IndexError(f"batch {s} out of range ({self._len} batches)")
        g0 = int(s) * self._global + self._p * self._lb
        rows = [self._w.example(self.window_of(g0 + j)) for j in range(self._lb)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def __str__(self):
        return (
            f"GlobalBatchMapDataset(windows={len(self._w)}, seq_len={self._w.seq_len}, "
            f"batch={self._lb}x{self._pc}, shuffle={self._shuffle})"
        )


def split_windows(shards: TokenShards, seq_len: int, eval_fraction: float) -> tuple[int, int]:
    """``(train_count, eval_count)``: the last ``ceil(eval_fraction * n)`` windows are the validation split."""
    n = max((shards.num_tokens - 1) // seq_len, 0)
    n_eval = int(np.ceil(eval_fraction * n)) if eval_fraction > 0 else 0
    return n - n_eval, n_eval


def make_token_dataset(data_cfg, *, split: str, batch_size: int, process_index: int = 0, process_count: int = 1):
    """grain dataset of batches for ``split`` in {"train", "eval"} from ``data.text.train_tokens`` (eval:
    ``data.text.eval_tokens``, or the held-out ``eval_fraction`` of the train directory).

    ``train`` repeats forever (reshuffled each epoch when ``data.text.shuffle``); ``eval`` is one ordered pass
    (the trailing partial global batch is dropped). Iterators are checkpointable (``get_state``/``set_state``).
    """
    t = data_cfg.text
    seq_len = data_cfg.seq_len
    train = TokenShards(t.train_tokens)
    _check_tokenizer(train, t.tokenizer, "data.text.train_tokens")
    n_train, n_eval = split_windows(train, seq_len, t.eval_fraction)
    if split == "train":
        windows = TokenWindows(train, seq_len, 0, n_train, t.document_boundaries)
    elif split == "eval":
        if t.eval_tokens:
            ev = TokenShards(t.eval_tokens)
            if ev.index["tokenizer_sha256"] != train.index["tokenizer_sha256"]:
                raise ValueError(
                    "data.text.eval_tokens: tokenised with another tokenizer than data.text.train_tokens "
                    f"({ev.index['tokenizer_sha256'][:12]} vs {train.index['tokenizer_sha256'][:12]})"
                )
            windows = TokenWindows(ev, seq_len, document_boundaries=t.document_boundaries)
        elif n_eval:
            windows = TokenWindows(train, seq_len, n_train, n_eval, t.document_boundaries)
        else:
            raise ValueError("data.text: no validation split; set data.text.eval_tokens or data.text.eval_fraction")
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    what = "train_tokens" if split == "train" else ("eval_tokens" if t.eval_tokens else "eval_fraction")
    try:
        ds = GlobalBatchMapDataset(
            windows,
            local_batch=batch_size,
            process_index=process_index,
            process_count=process_count,
            shuffle=t.shuffle and split == "train",
            seed=data_cfg.seed,
            repeat=split == "train",
        )
    except ValueError as e:
        raise ValueError(f"data.text.{what}: {e}") from None
    read = grain.ReadOptions(num_threads=max(data_cfg.num_workers, 1), prefetch_buffer_size=4)
    return ds.to_iter_dataset(read)


def _check_tokenizer(shards: TokenShards, tokenizer_path, what: str):
    """A configured tokenizer must be the one the corpus was tokenised with."""
    if tokenizer_path is None:
        return
    from canon_jax.data.shards import tokenizer_sha256
    from canon_jax.train.text_data import load_tokenizer

    h = tokenizer_sha256(load_tokenizer(tokenizer_path))
    if h != shards.index["tokenizer_sha256"]:
        raise ValueError(
            f"{what}: {shards.directory} was tokenised with another tokenizer (sha256 "
            f"{shards.index['tokenizer_sha256'][:12]}) than data.text.tokenizer {tokenizer_path} "
            f"({h[:12]})"
        )
