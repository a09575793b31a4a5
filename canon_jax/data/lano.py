"""Lano: hierarchical language structure — strings of a context-free grammar (the CFGs of Physics of LMs Part 1).

Sequence: ``[BOS] + terminals + [EOS]``; every token after BOS is labelled (the whole string is the text to learn, and
EOS teaches the model where a derivation ends).  Train and test strings are both sampled top-down from the grammar
with uniform rule choice (``CFG.sample`` from ``canon_jax.data.lano_grammar``; docs/tasks.md).  Official
ids: terminals 1..num_sym, the grammar's own eos id; BOS (undefined in the release) is exported as 9999.

Generation is blocked: the indices ``[b·64, (b+1)·64)`` form one block whose 64 strings come from one call of the
vectorised ``CFG.sample_batch`` with a numpy ``Generator`` seeded from the key of (task, params, split, seed, b·64);
sample i is row ``i mod 64`` of its block.  So sample i stays a pure function of (task, params, split, seed, i) —
independent of access order, workers and processes — while generation is ~30× faster than one ``CFG.sample`` call per
string.  :data:`BLOCK` is part of the stream's definition (changing it changes the samples).
"""

from __future__ import annotations

import functools

import numpy as np

from canon_jax.data import task as task_lib
from canon_jax.data.lano_grammar import CFG
from canon_jax.data.rng import mix_key_continue, numpy_rng
from canon_jax.data.task import BOS, EOS, NUM_SPECIAL

BLOCK = 64  # strings generated together; part of the stream's definition
_BLOCK_TAG = 0x1A40


@functools.cache
def load_cfg(name: str):
    return CFG.load(name)


def cfg_names() -> list[str]:
    return list(CFG.names())


class Lano(task_lib.Task):
    name = "lano"
    DEFAULTS = {"cfg": "cfg3f"}

    def _validate(self):
        names = cfg_names()
        if self.params["cfg"] not in names:
            raise ValueError(f"lano: unknown cfg {self.params['cfg']!r}; valid cfgs: {names}")
        self.cfg = load_cfg(self.params["cfg"])
        self._block_cache: dict = {}

    cache_blocks: int = 128  # blocks kept per instance (a 4096-index shuffle window touches 64)

    def __getstate__(self):  # grain pickles datasets into worker processes: do not ship the cache
        state = dict(self.__dict__)
        state["_block_cache"] = {}
        return state

    def block_strings(self, b0: int, split: str, seed: int) -> list[list[int]]:
        """The :data:`BLOCK` grammar strings (terminal ids) of samples ``b0 .. b0+BLOCK-1`` (``b0 % BLOCK == 0``)."""
        if b0 < 0 or b0 % BLOCK:
            raise ValueError(f"lano: a block starts at a multiple of {BLOCK} >= 0, got {b0}")
        g = numpy_rng(mix_key_continue(self.key(b0, split, seed), _BLOCK_TAG))
        return self.cfg.sample_batch(g, BLOCK)

    def sample(self, i: int, split: str = "train", seed: int = 0) -> task_lib.Sample:
        """Sample ``i``: row ``i mod BLOCK`` of its block (see the module docstring)."""
        i = int(i)
        if i < 0:
            raise ValueError(f"sample index must be >= 0, got {i}")
        r = i % BLOCK
        ck = (split, seed, i - r)
        block = self._block_cache.get(ck)
        if block is None:
            block = [np.asarray(self.terminal_codes(t), np.int32) for t in self.block_strings(i - r, split, seed)]
            self._block_cache[ck] = block
            while len(self._block_cache) > self.cache_blocks:  # oldest first (dict insertion order)
                self._block_cache.pop(next(iter(self._block_cache)))
        body = block[r]
        n = body.shape[0] + 2
        tokens = np.empty(n, np.int32)
        tokens[0], tokens[-1] = BOS, EOS
        tokens[1:-1] = body + self._delta
        labels = np.ones(n, np.int8)
        labels[0] = 0
        return task_lib.Sample(tokens=tokens, labels=labels, meta={"cfg": self.params["cfg"], "length": n - 2})

    def num_task_tokens(self):
        return int(self.cfg.num_sym)

    def official_map(self):
        m = np.zeros(NUM_SPECIAL + self.num_task_tokens(), dtype=np.int64)
        m[BOS], m[EOS] = 9999, int(self.cfg.eos_id)
        m[task_lib.ANSWER], m[task_lib.QUERY], m[task_lib.SEP] = 9500, 9997, 9700
        m[NUM_SPECIAL:] = np.arange(1, self.num_task_tokens() + 1)
        return m

    def code_name(self, code):
        return task_lib.SPECIAL_NAMES[code] if code < NUM_SPECIAL else str(code - NUM_SPECIAL + 1)

    def terminal_codes(self, terminals) -> list[int]:
        return [NUM_SPECIAL + int(t) - 1 for t in terminals]

    def sample_token(self, terminal: int) -> int:
        """Global id of grammar terminal ``terminal`` (1..num_sym)."""
        if not 1 <= terminal <= self.cfg.num_sym:
            raise ValueError(f"{self.name}: terminal must be in 1..{self.cfg.num_sym}, got {terminal}")
        return self.offset + terminal - 1

    def show(self, sample):
        return f"cfg={sample.meta['cfg']} length={sample.meta['length']}\n" + " ".join(self.decode(sample.tokens[1:-1]))
