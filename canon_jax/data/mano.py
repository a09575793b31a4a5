"""Mano: knowledge manipulation — evaluate a prefix-notation expression mod 23 "mentally" (docs/tasks.md).

An expression with ℓ operations is a random binary tree in prefix order: gen(0) = a value v ~ U{0..mod-1};
gen(ℓ) = op ~ U(ops), then l1 ~ U{0..ℓ-1} operations on the left and ℓ-1-l1 on the right.  ``÷`` (op "d") is the
modular inverse; a right subtree that evaluates to 0 under ÷ is redrawn.

Sequence (official ids): ``[9999|9998] [10ℓ|10ℓ+1] expression [10ℓ+4|10ℓ+5] [5000+answer]``; the alternatives (and the
op aliases + → 1|5, − → 2|6, × → 3|7, ÷ → 4|8) are drawn uniformly when ``knowledge_augment``, else the first one is
used.  Only the answer token is labelled.  Train: ℓ ~ U{1..L}; test: ℓ = L.

Randomness is counter-based (:class:`~canon_jax.data.rng.SplitMixRng`): sample i reads the uniform draws
u_0, u_1, … of the SplitMix64 stream keyed by (task, params, split, seed, i) in a fixed layout — u_0 gives ℓ (unused
in test), u_1 the three alias coins, u_2 … u_{2+2ℓ} the tree's nodes in prefix order (a leaf: value ⌊u·mod⌋; an
operation with k operations below it: one draw ⌊u·W·k⌋ split into the (op, alias) token and l1, W = number of
(op, alias) tokens); division redraws read further draws.  Because draw j of sample i is a fixed function of
(key_i, j), many samples are generated at once with numpy (:meth:`Mano.generate_many`, used by :meth:`Mano.sample`
through a cache of aligned index blocks) — bit-identical to the scalar reference path
(:meth:`Mano.sample_scalar`), which the tests check.  With division, the rows whose tree has a zero divisor (their
redraws make the draw layout data-dependent) are recomputed by the scalar path.
"""

from __future__ import annotations

import numpy as np

from canon_jax.data import task as task_lib
from canon_jax.data.rng import Rng, SplitMixRng, mix_keys_np, splitmix_uniform_np
from canon_jax.data.task import BOS, NUM_SPECIAL

OP_SYMBOLS = {"a": "+", "s": "-", "m": "*", "d": "/"}
OP_INDEX = {"a": 0, "s": 1, "m": 2, "d": 3}  # official op id = 1 + index (alias: 5 + index)


def apply_op(op: str, a: int, b: int, mod: int) -> int:
    if op == "a":
        return (a + b) % mod
    if op == "s":
        return (a - b) % mod
    if op == "m":
        return (a * b) % mod
    if op == "d":
        return (a * pow(b, mod - 2, mod)) % mod
    raise ValueError(op)


def _is_prime(m: int) -> bool:
    return m >= 2 and all(m % d for d in range(2, int(m**0.5) + 1))


class Mano(task_lib.Task):
    name = "mano"
    DEFAULTS = {"L": 10, "ops": "asm", "mod": 23, "knowledge_augment": True}
    RNG = SplitMixRng
    # samples generated together by the vectorised path (aligned blocks of indices) and blocks kept per instance;
    # 0 = always use the scalar path.  A window shuffle of 4096 indices touches 4 blocks of 1024.
    block_size: int = 1024
    cache_blocks: int = 16

    def _validate(self):
        p = self.params
        if p["L"] < 1:
            raise ValueError(f"{self.name}: L (number of operations) must be >= 1, got L={p['L']}")
        if p["mod"] < 2:
            raise ValueError(f"{self.name}: mod must be >= 2, got {p['mod']}")
        if not p["ops"] or any(c not in OP_SYMBOLS for c in p["ops"]) or len(set(p["ops"])) != len(p["ops"]):
            raise ValueError(
                f"{self.name}: ops must be distinct letters from {sorted(OP_SYMBOLS)} "
                f"(a=+, s=-, m=*, d=/), got {p['ops']!r}"
            )
        if "d" in p["ops"] and not _is_prime(p["mod"]):
            raise ValueError(f"{self.name}: division ('d' in ops) needs a prime mod, got mod={p['mod']}")
        self._ops = list(p["ops"])
        mod = p["mod"]
        self._val0 = NUM_SPECIAL
        self._op0 = NUM_SPECIAL + mod
        self._len0 = NUM_SPECIAL + mod + 8
        self._bos_alt = NUM_SPECIAL + mod + 8 + 4 * p["L"]
        # (op, alias) tokens drawn uniformly by _expr_fast, and each op token's kind (0 +, 1 -, 2 *, 3 /)
        n_alias = 2 if p["knowledge_augment"] else 1
        self._op_tokens = [self._op0 + OP_INDEX[o] + 4 * a for a in range(n_alias) for o in self._ops]
        self._op_kinds = [j % 4 for j in range(8)]
        self._block_cache: dict = {}
        # answer-only labels of a sample of length n (the last token), copied per sample
        self._labels = {}
        for n in range(7, 2 * p["L"] + 6):
            self._labels[n] = np.zeros(n, np.int8)
            self._labels[n][-1] = 1

    # codes: values 0..mod-1 | op ids 1..8 | per ℓ: 10ℓ, 10ℓ+1, 10ℓ+4, 10ℓ+5 | BOS alias (official 9998)
    def num_task_tokens(self):
        return self.params["mod"] + 8 + 4 * self.params["L"] + 1

    def value_code(self, v: int) -> int:
        return self._val0 + v

    def official_map(self):
        p = self.params
        m = np.zeros(NUM_SPECIAL + self.num_task_tokens(), dtype=np.int64)
        m[BOS], m[task_lib.EOS], m[task_lib.ANSWER], m[task_lib.QUERY], m[task_lib.SEP] = 9999, 9998, 9500, 9997, 9700
        m[self._val0 : self._val0 + p["mod"]] = 5000 + np.arange(p["mod"])
        m[self._op0 : self._op0 + 8] = np.arange(1, 9)
        for l in range(1, p["L"] + 1):
            m[self._len0 + 4 * (l - 1) : self._len0 + 4 * l] = [10 * l, 10 * l + 1, 10 * l + 4, 10 * l + 5]
        m[self._bos_alt] = 9998
        return m

    def code_name(self, code):
        if code < NUM_SPECIAL:
            return task_lib.SPECIAL_NAMES[code]
        if code < self._op0:
            return str(code - self._val0)
        if code < self._len0:
            j = code - self._op0
            return OP_SYMBOLS["asmd"[j % 4]] + ("'" if j >= 4 else "")
        if code < self._bos_alt:
            l, r = divmod(code - self._len0, 4)
            return [f"<len{l + 1}>", f"<len{l + 1}'>", "=", "='"][r]
        return "<bos'>"

    def _expr(self, rng: Rng, l: int, out: list[int]) -> int:
        """Recursive generator (any ops, division included): one draw per node in prefix order, exactly like
        :meth:`_expr_fast`; a ÷ whose divisor subtree evaluates to 0 redraws that subtree from the next draws."""
        mod = self.params["mod"]
        if l == 0:
            v = int(rng.random() * mod)
            out.append(self._val0 + v)
            return v
        width = len(self._op_tokens)
        m = int(rng.random() * (width * l))
        tok = self._op_tokens[m % width]
        l1 = m // width
        out.append(tok)
        op = "asmd"[(tok - self._op0) % 4]
        a = self._expr(rng, l1, out)
        mark = len(out)
        b = self._expr(rng, l - 1 - l1, out)
        while op == "d" and b == 0:  # redraw the divisor subtree
            del out[mark:]
            b = self._expr(rng, l - 1 - l1, out)
        return apply_op(op, a, b, mod)

    def _expr_fast(self, rng: Rng, l: int, out: list[int]) -> int:
        """Same law as :meth:`_expr` for op sets without division (no redraws): the tree is drawn iteratively in
        prefix order, then evaluated by a reverse scan — about twice as fast as the recursion."""
        rnd = rng.random
        mod, val0, op0 = self.params["mod"], self._val0, self._op0
        op_tokens, width = self._op_tokens, len(self._op_tokens)
        kinds = self._op_kinds
        emit = out.append
        start = len(out)
        stack = [l]
        push, pop = stack.append, stack.pop
        while stack:
            k = pop()
            if k == 0:
                emit(val0 + int(rnd() * mod))
            else:
                # one uniform draw m in [0, width * k) decomposed (mixed radix) into two independent uniform
                # choices: the (op, alias) token and the left subtree's number of operations l1
                m = int(rnd() * (width * k))
                emit(op_tokens[m % width])
                l1 = m // width
                push(k - 1 - l1)
                push(l1)  # the left subtree is emitted first
        vals: list[int] = []
        vpush, vpop = vals.append, vals.pop
        for c in reversed(out[start:]):
            if c < op0:
                vpush(c - val0)
            else:
                a = vpop()
                kind = kinds[c - op0]
                vpush((a + vpop()) % mod if kind == 0 else (a - vpop()) % mod if kind == 1 else (a * vpop()) % mod)
        return vals[0]

    def _generate(self, i, split, rng: Rng, seed=0):
        p = self.params
        u_len, u_alt = rng.random(), rng.random()  # always consumed: fixed draw layout (see module docstring)
        l = p["L"] if split == "test" else 1 + int(u_len * p["L"])
        # three independent fair coins for the BOS / length-token / '=' aliases (all False without augmentation)
        alts = int(u_alt * 8) if p["knowledge_augment"] else 0
        lbase = self._len0 + 4 * (l - 1)
        codes = [self._bos_alt if alts & 1 else BOS, lbase + (1 if alts & 2 else 0)]
        ans = self._expr(rng, l, codes) if "d" in self._ops else self._expr_fast(rng, l, codes)  # same draws
        codes.append(lbase + (3 if alts & 4 else 2))
        codes.append(self._val0 + ans)
        labels = np.zeros(len(codes), np.int8)
        labels[-1] = 1  # the answer token only
        return codes, labels, {"L": l, "answer": ans}

    # -- vectorised generation ------------------------------------------------------------------------------------
    def sample_scalar(self, i: int, split: str = "train", seed: int = 0) -> task_lib.Sample:
        """Sample ``i`` by the one-sample Python path (the reference the vectorised path must reproduce)."""
        return task_lib.Task.sample(self, i, split, seed)

    def sample(self, i: int, split: str = "train", seed: int = 0) -> task_lib.Sample:
        """Sample ``i`` of the ``split`` stream; computed with its aligned block of ``block_size`` indices."""
        i = int(i)
        if self.block_size <= 0 or i < 0:
            return self.sample_scalar(i, split, seed)
        r = i % self.block_size
        ck = (split, seed, i - r)
        block = self._block_cache.get(ck)
        if block is None:
            block = self._make_block(ck)
        codes, lengths, ells, answers = block
        n = lengths[r]
        return task_lib.Sample(
            tokens=codes[r, :n].copy(), labels=self._labels[n].copy(), meta={"L": ells[r], "answer": answers[r]}
        )

    def sample_many(self, indices, split: str = "train", seed: int = 0) -> list[task_lib.Sample]:
        """Samples ``indices`` (any order, any gaps) in one vectorised call; identical to :meth:`sample` each."""
        idx = [int(i) for i in indices]
        # numpy's per-call overhead makes small vectorised calls slow: few indices go through the block cache
        if self.block_size <= 0 or len(idx) < 128:
            return [self.sample(i, split, seed) for i in idx]
        codes, lengths, ells, answers = self.generate_many(np.asarray(idx, np.int64), split, seed)
        out = []
        for r, (n, l, a) in enumerate(zip(lengths.tolist(), ells.tolist(), answers.tolist())):
            out.append(
                task_lib.Sample(tokens=codes[r, :n].copy(), labels=self._labels[n].copy(), meta={"L": l, "answer": a})
            )
        return out

    def __getstate__(self):  # grain pickles datasets into worker processes: do not ship the cache
        state = dict(self.__dict__)
        state["_block_cache"] = {}
        return state

    def _make_block(self, ck):
        split, seed, b0 = ck
        codes, lengths, ells, answers = self.generate_many(np.arange(b0, b0 + self.block_size), split, seed)
        block = (codes, lengths.tolist(), ells.tolist(), answers.tolist())
        self._block_cache[ck] = block
        while len(self._block_cache) > self.cache_blocks:  # oldest first (plain dict: insertion order)
            self._block_cache.pop(next(iter(self._block_cache)))
        return block

    def generate_many(self, indices, split: str = "train", seed: int = 0):
        """Samples ``indices`` at once: returns ``(tokens, lengths, ells, answers)``.

        tokens: int32 ``[B, 2L+5]`` global ids, row b valid on its first ``lengths[b]`` entries (PAD after);
        lengths, ells, answers: int64 ``[B]`` (sample length, number of operations ℓ, answer value).
        Row b equals :meth:`sample_scalar` of ``indices[b]`` exactly.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if (idx < 0).any():
            raise ValueError(f"sample indices must be >= 0, got {idx[idx < 0][:3].tolist()}")
        p = self.params
        L, mod = p["L"], p["mod"]
        B, n_nodes_max = idx.shape[0], 2 * L + 1
        self.key(0, split, seed)  # fills the (seed, split) key prefix
        keys = mix_keys_np(self._key_prefix[(seed, split)], idx)
        u = splitmix_uniform_np(keys, 2 + n_nodes_max)  # [B, 2 + 2L + 1]
        ells = np.full(B, L, np.int64) if split == "test" else 1 + np.floor(u[:, 0] * L).astype(np.int64)
        alts = np.floor(u[:, 1] * 8).astype(np.int64) if p["knowledge_augment"] else np.zeros(B, np.int64)
        n_nodes = 2 * ells + 1
        op_tokens = np.asarray(self._op_tokens, np.int64)
        width = op_tokens.shape[0]
        rows = np.arange(B)
        # 1) draw the trees in prefix order with one explicit stack of pending subtree sizes per sample
        stack = np.zeros((B, L + 2), np.int64)
        stack[:, 0] = ells
        sp = np.ones(B, np.int64)
        expr = np.zeros((B, n_nodes_max), np.int64)  # local codes of the nodes
        for t in range(n_nodes_max):
            active = t < n_nodes
            top = np.maximum(sp - 1, 0)
            k = stack[rows, top]
            ut = u[:, 2 + t]
            leaf = k == 0
            m = np.floor(ut * (width * np.maximum(k, 1))).astype(np.int64)
            l1 = m // width
            expr[:, t] = np.where(leaf, self._val0 + np.floor(ut * mod).astype(np.int64), op_tokens[m % width])
            push = active & ~leaf
            sp = np.where(active, sp - 1, sp)
            # an operation replaces its entry by (right size, left size); the left subtree is emitted first
            stack[rows, np.where(push, sp, 0)] = np.where(push, k - 1 - l1, stack[rows, 0])
            stack[rows, np.where(push, sp + 1, 0)] = np.where(push, l1, stack[rows, 0])
            sp = np.where(push, sp + 2, sp)
        # 2) evaluate by a reverse scan with a value stack (kind: -1 value, 0 +, 1 -, 2 *)
        kind_of = np.full(self._op0 + 8, -1, np.int64)
        kind_of[self._op0 :] = self._op_kinds
        kind_all = kind_of[expr]
        value_all = expr - self._val0
        vals = np.zeros((B, L + 2), np.int64)
        vsp = np.zeros(B, np.int64)
        # modular inverses (0 -> 0: a zero divisor is redrawn below); zero_div marks rows that need the redraw
        inv = (
            np.array([pow(v, mod - 2, mod) if v else 0 for v in range(mod)], np.int64)
            if "d" in self._ops
            else np.zeros(mod, np.int64)
        )
        zero_div = np.zeros(B, bool)
        for t in range(n_nodes_max - 1, -1, -1):
            active = t < n_nodes
            kind = kind_all[:, t]
            is_val = kind < 0
            a = vals[rows, np.maximum(vsp - 1, 0)]
            b = vals[rows, np.maximum(vsp - 2, 0)]
            res = np.where(kind == 0, a + b, np.where(kind == 1, a - b, np.where(kind == 2, a * b, a * inv[b]))) % mod
            zero_div |= active & (kind == 3) & (b == 0)
            new = np.where(is_val, value_all[:, t], res)
            pos = np.where(is_val, vsp, vsp - 2)  # a value is pushed; an op pops two and pushes one
            pos = np.where(active, pos, 0)
            vals[rows, pos] = np.where(active, new, vals[rows, 0])
            vsp = np.where(active, pos + 1, vsp)
        answers = vals[:, 0]
        # 3) assemble [BOS|BOS'] [LEN|LEN'] expr [EQ|EQ'] answer
        width_out = n_nodes_max + 4
        out = np.full((B, width_out), task_lib.PAD, np.int64)
        lbase = self._len0 + 4 * (ells - 1)
        out[:, 0] = np.where(alts & 1, self._bos_alt, BOS)
        out[:, 1] = lbase + ((alts >> 1) & 1)
        out[:, 2 : 2 + n_nodes_max] = np.where(np.arange(n_nodes_max)[None, :] < n_nodes[:, None], expr, task_lib.PAD)
        out[rows, 2 + n_nodes] = lbase + np.where(alts & 4, 3, 2)
        out[rows, 3 + n_nodes] = self._val0 + answers
        if self._delta:
            out[out >= NUM_SPECIAL] += self._delta
        out = out.astype(np.int32)
        # a ÷ with a zero divisor redraws its divisor subtree from further draws (data-dependent layout): these rows
        # (about 1 in 10 for ops=asmd, L=10) are recomputed by the one-sample path, which reads the same draws
        for r in np.flatnonzero(zero_div).tolist():
            smp = self.sample_scalar(int(idx[r]), split, seed)
            out[r] = task_lib.PAD
            out[r, : len(smp)] = smp.tokens
            answers[r] = smp.meta["answer"]
        return out, n_nodes + 4, ells, answers

    def show(self, sample):
        """The prefix tokens and the expression in infix notation with its value."""
        codes = self.to_codes(sample.tokens).tolist()
        expr, pos = codes[2:-2], 0

        def infix():
            nonlocal pos
            c = expr[pos]
            pos += 1
            if c < self._op0:
                return str(c - self._val0)
            sym = OP_SYMBOLS["asmd"[(c - self._op0) % 4]]
            left = infix()
            return f"({left} {sym} {infix()})"

        return (
            f"L={sample.meta['L']} answer={sample.meta['answer']}\n"
            + " ".join(self.decode(sample.tokens))
            + f"\n{infix()} = {sample.meta['answer']} (mod {self.params['mod']})"
        )
