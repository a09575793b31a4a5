"""Depo: reasoning depth — k-hop successor queries on a directed cycle of n words (docs/tasks.md).

Official format (ids in the official convention): ``[BOS] + n edges "u v" (random order, optionally each preceded by
the separator 9700) + M queries "(9000+k) q 9500 a"`` where the words form the cycle vals[0] → vals[1] → … →
vals[n-1] → vals[0] and ``a`` is the k-th successor of ``q``.  Labels mark the answer marker and the answer word.

Train: n ~ P(n) ∝ 1/(n+√N) on 3..N, k ~ U{1..K} per query.  Test: n = N, k uniform over the powers of two ≤ K
(plus K when K is not a power of two).  Queries start at min(n, M) distinct random words.
"""

from __future__ import annotations

import numpy as np

from canon_jax.data import task as task_lib
from canon_jax.data.rng import HarmonicN, Rng
from canon_jax.data.task import ANSWER, BOS, NUM_SPECIAL, SEP
from canon_jax.data.words import distinct_words, num_possible_words


def test_hops(K: int) -> list[int]:
    """The k values of the Depo test split: powers of two ≤ K, plus K if it is not one."""
    ks, p = [], 1
    while p <= K:
        ks.append(p)
        p *= 2
    if ks[-1] != K:
        ks.append(K)
    return ks


class Depo(task_lib.Task):
    name = "depo"
    # depo1 official defaults (N in {375, 300, 225}; depo2 preset: N=125, K=16, mini_vocab=3, lengths 5-7).
    DEFAULTS = {"N": 375, "K": 8, "mini_vocab": 50, "min_len": 1, "max_len": 2, "M": 10, "separator": False}

    def _validate(self):
        p = self.params
        if p["N"] < 3:
            raise ValueError(f"{self.name}: N must be >= 3, got N={p['N']}")
        if not 1 <= p["K"] < p["N"]:
            raise ValueError(f"{self.name}: K must satisfy 1 <= K < N, got K={p['K']}, N={p['N']}")
        if p["mini_vocab"] < 1 or not 1 <= p["min_len"] <= p["max_len"]:
            raise ValueError(f"{self.name}: need mini_vocab >= 1 and 1 <= min_len <= max_len, got {p}")
        if num_possible_words(p["mini_vocab"], p["min_len"], p["max_len"]) < p["N"]:
            raise ValueError(
                f"{self.name}: mini_vocab={p['mini_vocab']} with word lengths "
                f"{p['min_len']}..{p['max_len']} cannot form N={p['N']} distinct words"
            )
        if p["M"] < 1:
            raise ValueError(f"{self.name}: M (queries per sample) must be >= 1, got {p['M']}")
        self._n_law = HarmonicN(p["N"])
        self._test_ks = test_hops(p["K"])

    # local codes: words 1..2mv -> NUM_SPECIAL + w - 1; hop k -> NUM_SPECIAL + 2mv + k - 1
    def num_task_tokens(self):
        return 2 * self.params["mini_vocab"] + self.params["K"]

    def word_code(self, w: int) -> int:
        return NUM_SPECIAL + w - 1

    def hop_code(self, k: int) -> int:
        return NUM_SPECIAL + 2 * self.params["mini_vocab"] + k - 1

    def official_map(self):
        mv, K = self.params["mini_vocab"], self.params["K"]
        m = np.zeros(NUM_SPECIAL + self.num_task_tokens(), dtype=np.int64)
        m[task_lib.BOS], m[ANSWER], m[SEP] = 9999, 9500, 9700
        m[task_lib.EOS], m[task_lib.QUERY] = 9998, 9997  # unused by Depo
        m[NUM_SPECIAL : NUM_SPECIAL + 2 * mv] = np.arange(1, 2 * mv + 1)
        m[NUM_SPECIAL + 2 * mv :] = 9000 + np.arange(1, K + 1)
        return m

    def code_name(self, code):
        mv = self.params["mini_vocab"]
        if code < NUM_SPECIAL:
            return task_lib.SPECIAL_NAMES[code]
        j = code - NUM_SPECIAL
        if j < 2 * mv:
            return f"w{j + 1}"
        return f"<hop{j - 2 * mv + 1}>"

    def test_ks(self) -> list[int]:
        return list(self._test_ks)

    def _generate(self, i, split, rng: Rng, seed=0):
        p = self.params
        n = p["N"] if split == "test" else self._n_law(rng)
        vals = distinct_words(rng, n, p["mini_vocab"], p["min_len"], p["max_len"])
        wc = [[NUM_SPECIAL + t - 1 for t in w] for w in vals]
        codes = [BOS]
        for a in rng.permutation(n):
            if p["separator"]:
                codes.append(SEP)
            codes += wc[a]
            codes += wc[(a + 1) % n]
        labels = [0] * len(codes)
        starts = rng.sample(range(n), min(n, p["M"]))
        ks = []
        for s in starts:
            k = rng.choice(self._test_ks) if split == "test" else rng.randint(1, p["K"])
            ks.append(k)
            q = [self.hop_code(k)] + wc[s] + [ANSWER]
            ans = wc[(s + k) % n]
            codes += q + ans
            labels += [0] * (len(q) - 1) + [1] * (1 + len(ans))  # the marker and the answer word
        return codes, labels, {"n": n, "ks": ks}

    def show(self, sample):
        """Edges as ``u -> v`` (words are joined token names) and queries as ``k-hop(q) = a``."""
        mv = self.params["mini_vocab"]
        codes = self.to_codes(sample.tokens).tolist()
        hop0 = NUM_SPECIAL + 2 * mv
        words, cur, i = [], [], 1
        while i < len(codes) and codes[i] < hop0:
            if codes[i] != SEP:
                cur.append(self.code_name(codes[i]))
                if codes[i] >= NUM_SPECIAL + mv:
                    words.append("_".join(cur))
                    cur = []
            i += 1
        lines = [f"n={sample.meta['n']} ks={sample.meta['ks']}", "edges:"]
        lines += [f"  {a} -> {b}" for a, b in zip(words[0::2], words[1::2])]
        lines.append("queries:")
        while i < len(codes):
            k = codes[i] - hop0 + 1
            j = codes.index(ANSWER, i)
            e = next((m for m in range(j + 1, len(codes)) if codes[m] >= hop0), len(codes))
            q = "_".join(self.code_name(c) for c in codes[i + 1 : j])
            a = "_".join(self.code_name(c) for c in codes[j + 1 : e])
            lines.append(f"  {k}-hop({q}) = {a}")
            i = e
        return "\n".join(lines)
