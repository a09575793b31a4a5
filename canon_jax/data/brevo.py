"""Brevo: reasoning breadth — list a query node's ancestors in a topological order (docs/tasks.md).

DAG: n nodes (Brevo1: a random n-subset of node ids 1..N; Brevo2: n distinct multi-token words) in random order; the
first L ~ U{1..⌊(n-1)/4⌋+1} are sources; every later node picks p ~ U{1..min(#cand, 4)} distinct parents among the
earlier nodes whose out-degree is still < 4.  The query is the last node.  The answer is the query's ancestors plus the
query, ordered by Kahn's algorithm run from the query side with uniform tie-breaking, then reversed (parents first,
query last).

Sequence: ``[BOS] + all edges "parent child" in random order + [QUERY, q, ANSWER] + answer + [EOS]``; labels 1 from
the answer marker through EOS.  canon-jax's ANSWER and EOS ids are distinct; the official export maps both to 9998.
Train: n ~ P(n) ∝ 1/(n+√N) on 3..N.  Test: n = N.
"""

from __future__ import annotations

import numpy as np

from canon_jax.data import task as task_lib
from canon_jax.data.rng import HarmonicN, Rng
from canon_jax.data.task import ANSWER, BOS, EOS, NUM_SPECIAL, QUERY
from canon_jax.data.words import distinct_words, num_possible_words

MAX_DEGREE = 4


def random_dag(rng: Rng, n: int) -> list[list[int]]:
    """parents[i] for nodes 0..n-1 (node i's parents are earlier nodes), following the official construction."""
    n_src = rng.randint(1, (n - 1) // 4 + 1)
    parents: list[list[int]] = [[] for _ in range(n)]
    outdeg = [0] * n
    avail = list(range(n_src))  # earlier nodes with out-degree < MAX_DEGREE, in index order
    rnd = rng.random
    for i in range(n_src, n):
        m = len(avail)
        if m:
            p = 1 + int(rnd() * min(m, MAX_DEGREE))
            # p distinct candidates, uniformly (draw-and-reject: p <= 4 is small, so no copy of the list)
            picked: list[int] = []
            while len(picked) < p:
                j = avail[int(rnd() * m)]
                if j not in picked:
                    picked.append(j)
            parents[i] = picked
            for j in picked:
                outdeg[j] += 1
                if outdeg[j] == MAX_DEGREE:
                    avail.remove(j)
        avail.append(i)
    return parents


def ancestors_topo(rng: Rng, parents: list[list[int]], query: int) -> list[int]:
    """Ancestors of ``query`` plus itself in a random topological order (parents before children, query last)."""
    anc, stack = {query}, [query]
    while stack:
        for p in parents[stack.pop()]:
            if p not in anc:
                anc.add(p)
                stack.append(p)
    # reverse Kahn: repeatedly remove a node none of whose children (inside anc) remain
    n_child = {v: 0 for v in anc}
    for v in anc:
        for p in parents[v]:
            n_child[p] += 1
    ready = [v for v in anc if n_child[v] == 0]
    order = []
    while ready:
        k = rng.below(len(ready))
        ready[k], ready[-1] = ready[-1], ready[k]
        v = ready.pop()
        order.append(v)
        for p in parents[v]:
            n_child[p] -= 1
            if n_child[p] == 0:
                ready.append(p)
    order.reverse()
    return order


class Brevo(task_lib.Task):
    name = "brevo"
    # brevo1 defaults (N in {110, 90, 70}); brevo2 preset: N=50, multi_token=True (mini_vocab 4, lengths 2-4).
    DEFAULTS = {"N": 110, "multi_token": False, "mini_vocab": 4, "min_len": 2, "max_len": 4}

    def _validate(self):
        p = self.params
        if p["N"] < 3:
            raise ValueError(f"{self.name}: N must be >= 3, got N={p['N']}")
        if not p["multi_token"] and any(p[k] != self.DEFAULTS[k] for k in ("mini_vocab", "min_len", "max_len")):
            raise ValueError(
                f"{self.name}: mini_vocab/min_len/max_len only apply with multi_token=True "
                f"(single-token nodes are the ids 1..N)"
            )
        if p["multi_token"]:
            if p["mini_vocab"] < 1 or not 1 <= p["min_len"] <= p["max_len"]:
                raise ValueError(f"{self.name}: need mini_vocab >= 1 and 1 <= min_len <= max_len, got {p}")
            if num_possible_words(p["mini_vocab"], p["min_len"], p["max_len"]) < p["N"]:
                raise ValueError(
                    f"{self.name}: mini_vocab={p['mini_vocab']} with word lengths "
                    f"{p['min_len']}..{p['max_len']} cannot form N={p['N']} distinct words"
                )
        self._n_law = HarmonicN(p["N"])

    def num_task_tokens(self):
        p = self.params
        return 2 * p["mini_vocab"] if p["multi_token"] else p["N"]

    def official_map(self):
        m = np.zeros(NUM_SPECIAL + self.num_task_tokens(), dtype=np.int64)
        m[BOS], m[EOS], m[ANSWER], m[QUERY], m[task_lib.SEP] = 9999, 9998, 9998, 9997, 9700
        m[NUM_SPECIAL:] = np.arange(1, self.num_task_tokens() + 1)
        return m

    def code_name(self, code):
        if code < NUM_SPECIAL:
            return task_lib.SPECIAL_NAMES[code]
        return ("w" if self.params["multi_token"] else "") + str(code - NUM_SPECIAL + 1)

    def _generate(self, i, split, rng: Rng, seed=0):
        p = self.params
        n = p["N"] if split == "test" else self._n_law(rng)
        if p["multi_token"]:
            words = distinct_words(rng, n, p["mini_vocab"], p["min_len"], p["max_len"])
            names = [[NUM_SPECIAL + t - 1 for t in w] for w in words]
        else:
            names = [[NUM_SPECIAL + v - 1] for v in rng.sample(range(1, p["N"] + 1), n)]
        parents = random_dag(rng, n)
        edges = [(a, b) for b in range(n) for a in parents[b]]
        rng.shuffle(edges)
        query = n - 1
        order = ancestors_topo(rng, parents, query)
        codes = [BOS]
        for a, b in edges:
            codes += names[a] + names[b]
        codes += [QUERY] + names[query]
        labels = [0] * len(codes)
        ans = [ANSWER]
        for v in order:
            ans += names[v]
        ans.append(EOS)
        codes += ans
        labels += [1] * len(ans)
        return codes, labels, {"n": n, "num_answer_nodes": len(order)}

    def show(self, sample):
        """Edges as ``parent -> child``, the query and the answer list (node names joined with ``_``)."""
        codes = self.to_codes(sample.tokens).tolist()
        q, a = codes.index(QUERY), codes.index(ANSWER)

        def names(cs):
            if not self.params["multi_token"]:
                return [self.code_name(c) for c in cs]
            out, cur = [], []
            for c in cs:
                cur.append(self.code_name(c))
                if c >= NUM_SPECIAL + self.params["mini_vocab"]:
                    out.append("_".join(cur))
                    cur = []
            return out

        nodes = names(codes[1:q])
        lines = [f"n={sample.meta['n']}", "edges:"] + [f"  {p} -> {c}" for p, c in zip(nodes[0::2], nodes[1::2])]
        lines.append(f"query: {' '.join(names(codes[q + 1 : a]))}")
        end = codes.index(EOS, a) if EOS in codes[a:] else len(codes)
        lines.append(f"answer: {' '.join(names(codes[a + 1 : end]))}")
        return "\n".join(lines)
