"""Mano: knowledge manipulation — evaluate a prefix-notation expression mod 23 "mentally" (SPEC B.3, 0.2, 0.4).

An expression with ℓ operations is a random binary tree in prefix order: gen(0) = a value v ~ U{0..mod-1};
gen(ℓ) = op ~ U(ops), then l1 ~ U{0..ℓ-1} operations on the left and ℓ-1-l1 on the right.  ``÷`` (op "d") is the
modular inverse; a right subtree that evaluates to 0 under ÷ is redrawn.

Sequence (official ids): ``[9999|9998] [10ℓ|10ℓ+1] expression [10ℓ+4|10ℓ+5] [5000+answer]``; the alternatives (and the
op aliases + → 1|5, − → 2|6, × → 3|7, ÷ → 4|8) are drawn uniformly when ``knowledge_augment``, else the first one is
used.  Only the answer token is labelled.  Train: ℓ ~ U{1..L}; test: ℓ = L.
"""
from __future__ import annotations

import numpy as np

from canon_jax.data import base
from canon_jax.data.base import BOS, NUM_SPECIAL
from canon_jax.data.rng import Rng

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
    return m >= 2 and all(m % d for d in range(2, int(m ** 0.5) + 1))


class Mano(base.Task):
    name = "mano"
    DEFAULTS = {"L": 10, "ops": "asm", "mod": 23, "knowledge_augment": True}

    def _validate(self):
        p = self.params
        if p["L"] < 1:
            raise ValueError(f"{self.name}: L (number of operations) must be >= 1, got L={p['L']}")
        if p["mod"] < 2:
            raise ValueError(f"{self.name}: mod must be >= 2, got {p['mod']}")
        if not p["ops"] or any(c not in OP_SYMBOLS for c in p["ops"]) or len(set(p["ops"])) != len(p["ops"]):
            raise ValueError(f"{self.name}: ops must be distinct letters from {sorted(OP_SYMBOLS)} "
                             f"(a=+, s=-, m=*, d=/), got {p['ops']!r}")
        if "d" in p["ops"] and not _is_prime(p["mod"]):
            raise ValueError(f"{self.name}: division ('d' in ops) needs a prime mod, got mod={p['mod']}")
        self._ops = list(p["ops"])
        mod = p["mod"]
        self._val0 = NUM_SPECIAL
        self._op0 = NUM_SPECIAL + mod
        self._len0 = NUM_SPECIAL + mod + 8
        self._bos_alt = NUM_SPECIAL + mod + 8 + 4 * p["L"]

    # codes: values 0..mod-1 | op ids 1..8 | per ℓ: 10ℓ, 10ℓ+1, 10ℓ+4, 10ℓ+5 | BOS alias (official 9998)
    def num_task_tokens(self):
        return self.params["mod"] + 8 + 4 * self.params["L"] + 1

    def value_code(self, v: int) -> int:
        return self._val0 + v

    def official_map(self):
        p = self.params
        m = np.zeros(NUM_SPECIAL + self.num_task_tokens(), dtype=np.int64)
        m[BOS], m[base.EOS], m[base.ANSWER], m[base.QUERY], m[base.SEP] = 9999, 9998, 9500, 9997, 9700
        m[self._val0:self._val0 + p["mod"]] = 5000 + np.arange(p["mod"])
        m[self._op0:self._op0 + 8] = np.arange(1, 9)
        for l in range(1, p["L"] + 1):
            m[self._len0 + 4 * (l - 1):self._len0 + 4 * l] = [10 * l, 10 * l + 1, 10 * l + 4, 10 * l + 5]
        m[self._bos_alt] = 9998
        return m

    def code_name(self, code):
        p = self.params
        if code < NUM_SPECIAL:
            return base.SPECIAL_NAMES[code]
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
        mod = self.params["mod"]
        if l == 0:
            v = rng.below(mod)
            out.append(self._val0 + v)
            return v
        op = self._ops[rng.below(len(self._ops))]
        alias = 4 if (self.params["knowledge_augment"] and rng.random() < 0.5) else 0
        out.append(self._op0 + OP_INDEX[op] + alias)
        l1 = rng.below(l)
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
        op_idx = [OP_INDEX[o] for o in self._ops]
        nops, n_alias = len(op_idx), (2 if self.params["knowledge_augment"] else 1)
        start = len(out)
        stack = [l]
        while stack:
            k = stack.pop()
            if k == 0:
                out.append(val0 + int(rnd() * mod))
            else:
                # one uniform draw m in [0, nops * n_alias * k) decomposed (mixed radix) into three independent
                # uniform choices: the op, its alias and the left subtree's number of operations l1
                m = int(rnd() * (nops * n_alias * k))
                out.append(op0 + op_idx[m % nops] + 4 * ((m // nops) % n_alias))
                l1 = m // (nops * n_alias)
                stack.append(k - 1 - l1)
                stack.append(l1)  # the left subtree is emitted first
        vals: list[int] = []
        for c in reversed(out[start:]):
            if c < op0:
                vals.append(c - val0)
            else:
                a = vals.pop()
                b = vals.pop()
                oi = (c - op0) % 4
                vals.append((a + b) % mod if oi == 0 else (a - b) % mod if oi == 1 else (a * b) % mod)
        return vals[0]

    def _generate(self, i, split, rng: Rng, seed=0):
        p = self.params
        l = p["L"] if split == "test" else 1 + rng.below(p["L"])
        # three independent fair coins for the BOS / length-token / '=' aliases (all False without augmentation)
        alts = int(rng.random() * 8) if p["knowledge_augment"] else 0
        lbase = self._len0 + 4 * (l - 1)
        codes = [self._bos_alt if alts & 1 else BOS, lbase + (1 if alts & 2 else 0)]
        ans = self._expr(rng, l, codes) if "d" in self._ops else self._expr_fast(rng, l, codes)
        codes.append(lbase + (3 if alts & 4 else 2))
        codes.append(self._val0 + ans)
        labels = np.zeros(len(codes), np.int8)
        labels[-1] = 1  # the answer token only
        return codes, labels, {"L": l, "answer": ans}

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

        return (f"L={sample.meta['L']} answer={sample.meta['answer']}\n" + " ".join(self.decode(sample.tokens)) +
                f"\n{infix()} = {sample.meta['answer']} (mod {self.params['mod']})")
