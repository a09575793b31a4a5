"""Lano: hierarchical language structure — strings of a context-free grammar (Part 1 CFGs; SPEC B.5, 0.6).

Sequence: ``[BOS] + terminals + [EOS]``; every token after BOS is labelled (the whole string is the text to learn, and
EOS teaches the model where a derivation ends).  Train and test strings are both sampled top-down from the grammar
with uniform rule choice (``CFG.sample`` from ``canon_jax.data.lano_grammar``, written by the LANO helper).  Official
ids: terminals 1..num_sym, the grammar's own eos id; BOS (undefined in the release) is exported as 9999.
"""
from __future__ import annotations

import functools

import numpy as np

from canon_jax.data import base
from canon_jax.data.base import BOS, EOS, NUM_SPECIAL
from canon_jax.data.rng import Rng, numpy_rng


@functools.lru_cache(maxsize=None)
def load_cfg(name: str):
    from canon_jax.data.lano_grammar import CFG  # lazy: the grammar module is owned by the Lano component

    return CFG.load(name)


def cfg_names() -> list[str]:
    from canon_jax.data.lano_grammar import CFG

    return list(CFG.names())


class Lano(base.Task):
    name = "lano"
    DEFAULTS = {"cfg": "cfg3f"}

    def _validate(self):
        names = cfg_names()
        if self.params["cfg"] not in names:
            raise ValueError(f"lano: unknown cfg {self.params['cfg']!r}; valid cfgs: {names}")
        self.cfg = load_cfg(self.params["cfg"])

    def num_task_tokens(self):
        return int(self.cfg.num_sym)

    def official_map(self):
        m = np.zeros(NUM_SPECIAL + self.num_task_tokens(), dtype=np.int64)
        m[BOS], m[EOS] = 9999, int(self.cfg.eos_id)
        m[base.ANSWER], m[base.QUERY], m[base.SEP] = 9500, 9997, 9700
        m[NUM_SPECIAL:] = np.arange(1, self.num_task_tokens() + 1)
        return m

    def code_name(self, code):
        return base.SPECIAL_NAMES[code] if code < NUM_SPECIAL else str(code - NUM_SPECIAL + 1)

    def terminal_codes(self, terminals) -> list[int]:
        return [NUM_SPECIAL + int(t) - 1 for t in terminals]

    def sample_token(self, terminal: int) -> int:
        """Global id of grammar terminal ``terminal`` (1..num_sym)."""
        if not 1 <= terminal <= self.cfg.num_sym:
            raise ValueError(f"{self.name}: terminal must be in 1..{self.cfg.num_sym}, got {terminal}")
        return self.offset + terminal - 1

    def _generate(self, i, split, rng: Rng, seed=0):
        # CFG.sample takes a numpy Generator; derive it from this sample's own stream
        g = numpy_rng(int(rng.random() * (1 << 53)))
        seq = self.cfg.sample(g)
        codes = [BOS] + self.terminal_codes(seq) + [EOS]
        labels = [0] + [1] * (len(codes) - 1)
        return codes, labels, {"cfg": self.params["cfg"], "length": len(seq)}

    def show(self, sample):
        return f"cfg={sample.meta['cfg']} length={sample.meta['length']}\n" + " ".join(self.decode(sample.tokens[1:-1]))
