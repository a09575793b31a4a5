"""Lano context-free grammars (docs/tasks.md): loading, sampling, fast exact membership, true next-token distribution.

The Lano grammars are *layered*: a symbol of level ``l`` expands only to symbols of level ``l + 1``, the root is the
single symbol of level 0 and the last level holds the terminals ``1..num_sym``. Every derivation therefore has exactly
``depth`` non-terminal levels, and every dynamic program below runs one level at a time, bottom-up, with no fixed
point to iterate (no unary or recursive cycles exist).

* :meth:`CFG.sample` / :meth:`CFG.sample_batch` -- top-down expansion with uniform rule choice (an explicit stack,
  or one vectorised step per level for a batch).
* :meth:`CFG.accepts` -- exact membership for a batch of strings, which are concatenated on one position axis
  (spans crossing a string boundary are dropped). Two exact DPs over spans: sorted span lists joined on the split
  point (fast because sampled, corrupted and random strings derive few spans), and packed bitsets over (span
  length, start position) whose cost does not depend on how many spans are derivable; ``"auto"`` hands only
  span-dense strings (periodic ones such as ``1 2 1 2 ...``) to the bitsets.
* :meth:`CFG.next_token_logprobs` -- the grammar's exact next-token distribution for every prefix of one string:
  float64 log-space inside probabilities on span lists, then a top-down "left context" pass (details in the method).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CFG", "CFG_NAMES"]

CFG_NAMES = ("cfg3b", "cfg3e1", "cfg3e2", "cfg3f", "cfg3g", "cfg3h", "cfg3i", "cfg3j", "cfg3k")

_NEG_INF = -np.inf
# Positions per chunk of the batched membership DP: bounds the bitset tables to a few MiB per symbol.
_ACCEPT_CHUNK_POSITIONS = 1 << 16


# ----------------------------------------------------------------------------------------------------------------
# Grammar object
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CFG:
    """A layered Lano grammar.

    Attributes:
      name: config name (``"cfg3f"``) or ``"custom"``.
      depth: number of non-terminal levels (the root is level 0, terminals are level ``depth``).
      num_sym: number of terminals; terminal ids are ``1..num_sym``.
      eos_id: the config's end-of-string token id (``eos_token`` in the JSON).
      rules: ``rules[l][s]`` = tuple of rules of symbol ``s`` of level ``l`` (``l < depth``); a rule is a tuple of
        indices into level ``l + 1`` (for ``l = depth - 1``: terminal index ``0..num_sym-1`` = terminal id − 1).
      symbol_ids: ``symbol_ids[l][s]`` = the config's id of symbol ``s`` of level ``l`` (``idx`` in the JSON).
    """

    name: str
    depth: int
    num_sym: int
    eos_id: int
    rules: tuple
    symbol_ids: tuple

    # ---------------------------------------------------------------- construction

    @staticmethod
    def names() -> tuple[str, ...]:
        """Names of the packaged grammars (``canon_jax/data/assets/lano_cfgs/<name>.json``)."""
        return CFG_NAMES

    @classmethod
    def load(cls, name: str) -> CFG:
        """Loads a packaged grammar by name (one of :meth:`names`)."""
        return _load_cached(name)

    @classmethod
    def from_dict(cls, d: dict, name: str = "custom") -> CFG:
        """Builds a grammar from the official JSON structure (the release's ``Lano-cfg/configs/*.json``), validating it.

        Required fields: ``depth``, ``num_sym``, ``eos_token``, ``sizes``, ``all``; ``idx`` is optional.
        """
        for key in ("depth", "num_sym", "eos_token", "sizes", "all"):
            if key not in d:
                raise ValueError(f"CFG {name!r}: missing field {key!r}")
        depth, num_sym, sizes, levels = int(d["depth"]), int(d["num_sym"]), list(d["sizes"]), d["all"]
        if depth < 1:
            raise ValueError(f"CFG {name!r}: depth must be >= 1, got {depth}")
        if len(sizes) != depth + 1 or len(levels) != depth + 1:
            raise ValueError(
                f"CFG {name!r}: 'sizes' and 'all' must have depth + 1 = {depth + 1} levels, "
                f"got {len(sizes)} and {len(levels)}"
            )
        if sizes[0] != 1:
            raise ValueError(f"CFG {name!r}: level 0 must hold exactly one (root) symbol, sizes[0] = {sizes[0]}")
        if num_sym < 1:
            raise ValueError(f"CFG {name!r}: num_sym must be >= 1, got {num_sym}")
        if 1 <= int(d["eos_token"]) <= num_sym:
            raise ValueError(f"CFG {name!r}: eos_token {d['eos_token']} collides with terminal ids 1..{num_sym}")
        if sizes[depth] != num_sym:
            raise ValueError(f"CFG {name!r}: last level size {sizes[depth]} != num_sym {num_sym}")
        rules = []
        for lvl in range(depth):
            if len(levels[lvl]) != sizes[lvl]:
                raise ValueError(f"CFG {name!r}: level {lvl} lists {len(levels[lvl])} symbols, sizes says {sizes[lvl]}")
            lvl_rules = []
            for s, sym in enumerate(levels[lvl]):
                children = sym.get("children")
                if not children:
                    raise ValueError(f"CFG {name!r}: symbol {s} of level {lvl} has no rules")
                sym_rules = []
                for rule in children:
                    rule = tuple(int(c) for c in rule)
                    if len(rule) == 0:
                        raise ValueError(f"CFG {name!r}: empty rule for symbol {s} of level {lvl}")
                    if min(rule) < 0 or max(rule) >= sizes[lvl + 1]:
                        raise ValueError(
                            f"CFG {name!r}: rule {rule} of symbol {s} (level {lvl}) indexes outside "
                            f"level {lvl + 1} (size {sizes[lvl + 1]})"
                        )
                    sym_rules.append(rule)
                lvl_rules.append(tuple(sym_rules))
            rules.append(tuple(lvl_rules))
        idx = d.get("idx")
        if idx is None:  # no config ids: within-level indices, terminals by their ids
            symbol_ids = tuple(tuple(range(n)) for n in sizes[:-1]) + (tuple(range(1, num_sym + 1)),)
        else:
            symbol_ids = tuple(tuple(int(v) for v in level) for level in idx)
            if [len(level) for level in symbol_ids] != sizes:
                raise ValueError(
                    f"CFG {name!r}: 'idx' has {[len(level) for level in symbol_ids]} ids per level, "
                    f"'sizes' says {sizes}"
                )
        return cls(
            name=name,
            depth=depth,
            num_sym=num_sym,
            eos_id=int(d["eos_token"]),
            rules=tuple(rules),
            symbol_ids=symbol_ids,
        )

    # ---------------------------------------------------------------- structure

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of symbols per level, root first, terminals last."""
        return tuple(len(level) for level in self.rules) + (self.num_sym,)

    @functools.cached_property
    def _len_bounds(self):
        """Per level and symbol, the (min, max) length of the strings it derives."""
        lo = [np.ones(self.num_sym, np.int64)]
        hi = [np.ones(self.num_sym, np.int64)]
        for lvl in range(self.depth - 1, -1, -1):
            clo, chi = lo[0], hi[0]
            lo.insert(0, np.array([min(int(clo[list(r)].sum()) for r in rs) for rs in self.rules[lvl]]))
            hi.insert(0, np.array([max(int(chi[list(r)].sum()) for r in rs) for rs in self.rules[lvl]]))
        return lo, hi

    @property
    def min_len(self) -> int:
        """Length of the shortest sentence."""
        return int(self._len_bounds[0][0][0])

    @property
    def max_len(self) -> int:
        """Length of the longest sentence."""
        return int(self._len_bounds[1][0][0])

    # ---------------------------------------------------------------- sampling

    def sample(self, rng: np.random.Generator, *, return_ancestors: bool = False):
        """Samples one sentence top-down, choosing each symbol's rule uniformly at random.

        Args:
          rng: numpy random generator.
          return_ancestors: also return, per token, the within-level index of its ancestor at every level.
        Returns:
          ``list[int]`` of terminal ids (``1..num_sym``); with ``return_ancestors`` a tuple ``(tokens, ancestors)``
          where ``ancestors: [len, depth]`` int32 and ``ancestors[t, l]`` is the index (into level ``l``) of the
          level-``l`` symbol that token ``t`` descends from (map to config ids with :attr:`symbol_ids`).
        """
        tokens: list[int] = []
        chains: list[tuple[int, ...]] = []
        # Explicit stack of (level, symbol, chain of ancestors above it); children pushed in reverse so that the
        # leftmost is expanded first (left-to-right output, no recursion).
        stack = [(0, 0, ())]
        rules, depth = self.rules, self.depth
        while stack:
            lvl, sym, chain = stack.pop()
            if lvl == depth:
                tokens.append(sym + 1)
                if return_ancestors:
                    chains.append(chain)
                continue
            options = rules[lvl][sym]
            rule = options[int(rng.integers(len(options)))]
            chain = chain + (sym,) if return_ancestors else chain
            for child in reversed(rule):
                stack.append((lvl + 1, child, chain))
        if return_ancestors:
            return tokens, np.asarray(chains, np.int32).reshape(len(tokens), depth)
        return tokens

    @functools.cached_property
    def _rule_arrays(self):
        """Per level: (number of rules [S], padded rules [S, Rmax, Lmax], rule lengths [S, Rmax])."""
        out = []
        for level in self.rules:
            r_max = max(len(rs) for rs in level)
            l_max = max(len(r) for rs in level for r in rs)
            padded = np.zeros((len(level), r_max, l_max), np.int64)
            lengths = np.zeros((len(level), r_max), np.int64)
            for s, rs in enumerate(level):
                for k, r in enumerate(rs):
                    padded[s, k, : len(r)] = r
                    lengths[s, k] = len(r)
            out.append((np.array([len(rs) for rs in level]), padded, lengths))
        return out

    def sample_batch(self, rng: np.random.Generator, n: int, *, return_ancestors: bool = False):
        """``n`` independent sentences, expanded one level at a time for the whole batch (vectorised; much faster
        than :meth:`sample` for many strings, same distribution, different random stream).

        Returns:
          ``list`` of ``n`` lists of terminal ids; with ``return_ancestors`` also a list of ``[len, depth]`` int32
          ancestor arrays as in :meth:`sample`.
        """
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"CFG.sample_batch: n must be an int >= 0, got {n!r}")
        if n == 0:
            return ([], []) if return_ancestors else []
        syms = np.zeros(n, np.int64)  # current frontier, left to right, string by string
        owner = np.arange(n)
        anc = np.zeros((n, 0), np.int32)
        for deg, padded, lengths in self._rule_arrays:
            choice = rng.integers(0, deg[syms])
            lens = lengths[syms, choice]
            children = padded[syms, choice]  # [M, Lmax]
            keep = np.arange(children.shape[1])[None, :] < lens[:, None]
            if return_ancestors:
                anc = np.repeat(np.concatenate([anc, syms[:, None].astype(np.int32)], axis=1), lens, axis=0)
            syms, owner = children[keep], np.repeat(owner, lens)
        cuts = np.cumsum(np.bincount(owner, minlength=n))[:-1]
        tokens = [t.tolist() for t in np.split(syms + 1, cuts)]
        if return_ancestors:
            return tokens, np.split(anc, cuts)
        return tokens

    # ---------------------------------------------------------------- membership

    def accepts(self, seqs, *, method: str = "auto") -> np.ndarray:
        """Exact membership test for a batch of terminal-id strings.

        Two exact dynamic programs over (start, end) spans, level by level bottom-up:

        * ``"sparse"``: per symbol, the sorted list of spans it derives; concatenation is a vectorised join on the
          split point. Sampled, corrupted and random strings derive few spans, so this is usually fastest.
        * ``"bitset"``: per symbol, a packed bitset of start positions for every possible span length. Its cost does
          not depend on how many spans are derivable (periodic strings such as ``1 2 1 2 ...`` can derive many).
        * ``"auto"``: span lists, except that a string whose joins exceed a budget of candidate spans per position is
          handed to the bitset DP.

        Args:
          seqs: a sequence of strings, each a list/array of ints (terminal ids ``1..num_sym``).
          method: ``"auto"``, ``"sparse"`` or ``"bitset"`` (all give identical verdicts).
        Returns:
          ``[len(seqs)]`` bool: True iff the root derives exactly that string. Empty strings, ids outside
          ``1..num_sym`` (EOS included), non-integer entries and strings of impossible length give False.
        """
        if isinstance(seqs, np.ndarray) and seqs.ndim == 1 and seqs.dtype != object:
            raise ValueError(
                "CFG.accepts: expected a batch of strings (list of lists or 2-D array), got a 1-D "
                "array; wrap a single string as [seq]"
            )
        if method not in ("auto", "sparse", "bitset"):
            raise ValueError(f"CFG.accepts: method must be one of 'auto', 'sparse', 'bitset', got {method!r}")
        seqs = list(seqs)
        out = np.zeros(len(seqs), bool)
        lo, hi = self.min_len, self.max_len
        todo = []
        for k, s in enumerate(seqs):
            arr = _as_int_array(s)
            if arr is None or not (lo <= arr.size <= hi):
                continue
            if arr.min() < 1 or arr.max() > self.num_sym:
                continue
            todo.append((k, arr))
        # Sort by length so chunks hold similar lengths (the tables are capped at the chunk's longest string).
        todo.sort(key=lambda item: item[1].size)
        start = 0
        while start < len(todo):
            stop, total = start, 0
            while stop < len(todo) and (stop == start or total + todo[stop][1].size <= _ACCEPT_CHUNK_POSITIONS):
                total += todo[stop][1].size
                stop += 1
            chunk = todo[start:stop]
            arrs = [a for _, a in chunk]
            if method == "bitset":
                verdict = self._accepts_chunk_bitset(arrs)
            elif method == "sparse":
                verdict = self._accepts_chunk_sparse(arrs, None)
            else:
                verdict = self._accepts_auto(arrs)
            out[[k for k, _ in chunk]] = verdict
            start = stop
        return out

    def _accepts_auto(self, arrs: list[np.ndarray]) -> np.ndarray:
        """Span lists, except for strings that derive too many spans: those go to the bitset DP (whose cost does not
        depend on density) and the span-list DP is rerun on the others."""
        verdict = np.zeros(len(arrs), bool)
        remaining = np.arange(len(arrs))
        while remaining.size:
            result = self._accepts_chunk_sparse([arrs[i] for i in remaining], _SPARSE_SPAN_BUDGET)
            if isinstance(result, _OverBudget):
                dense = remaining[result.strings]
                verdict[dense] = self._accepts_chunk_bitset([arrs[i] for i in dense])
                remaining = np.setdiff1d(remaining, dense)
            else:
                verdict[remaining] = result
                break
        return verdict

    def _accepts_chunk_sparse(self, arrs: list[np.ndarray], budget_per_position):
        """Membership by joining sorted span lists. With a budget, returns an ``_OverBudget`` naming the strings
        (indices into ``arrs``) whose joins produced more than ``budget_per_position * len`` candidate spans."""
        lens = np.array([a.size for a in arrs], np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        x = np.concatenate(arrs)
        n_pos = x.size
        # string_end[p] = end of the string holding position p: spans crossing a string boundary are dropped, which
        # keeps the lists small and cannot lose a whole-string parse.
        string_end = np.append(np.repeat(starts + lens, lens), n_pos)
        string_id = np.append(np.repeat(np.arange(len(arrs)), lens), len(arrs))
        budget = None if budget_per_position is None else (string_id, budget_per_position * lens + 64)
        pos = np.arange(n_pos, dtype=np.int64)
        spans = [_Spans(pos[x == a + 1], pos[x == a + 1] + 1) for a in range(self.num_sym)]
        try:
            for lvl in range(self.depth - 1, -1, -1):
                cache: dict = {}
                spans = [
                    _Spans.union(
                        [_span_suffix(spans, rule, cache, string_end, budget) for rule in sym_rules], n_pos + 1
                    )
                    for sym_rules in self.rules[lvl]
                ]
        except _OverBudget as e:
            return e
        root = spans[0]
        whole = starts * (n_pos + 1) + starts + lens
        return np.isin(whole, root.starts * (n_pos + 1) + root.ends)

    def _accepts_chunk_bitset(self, arrs: list[np.ndarray]) -> np.ndarray:
        """Membership with packed-bitset tables over (span length, start position); cost independent of density."""
        lens = np.array([a.size for a in arrs], np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        x = np.concatenate(arrs)
        max_n = int(lens.max())
        nw = (x.size + 63) // 64 + 1  # one spare zero word so shifted reads past the end see zeros
        lo_all, hi_all = self._len_bounds

        # Terminal tables: span length exactly 1.
        tables = [_BitTable(1, _pack_bits(x == a + 1, nw)[None]) for a in range(self.num_sym)]
        for lvl in range(self.depth - 1, 0, -1):
            cache: dict = {}
            new = []
            for s, sym_rules in enumerate(self.rules[lvl]):
                s_lo, s_hi = int(lo_all[lvl][s]), min(int(hi_all[lvl][s]), max_n)
                acc = _BitTable.empty(s_lo, s_hi, nw)
                for rule in sym_rules:
                    acc.or_(_concat_suffix(tables, rule, cache, max_n))
                new.append(acc)
            tables = new

        # Root: only whole strings matter, so each rule is checked by gathering bits rather than building tables.
        ok = np.zeros(len(arrs), bool)
        for rule in self.rules[0][0]:
            last = tables[rule[-1]]
            if len(rule) == 1:
                ok |= last.bits_at(lens, starts)
                continue
            prefix = tables[rule[0]]
            for c in rule[1:-1]:
                prefix = _bit_concat(prefix, tables[c], max_n)
            if prefix.rows == 0 or last.rows == 0:
                continue
            d = np.arange(prefix.lo, prefix.lo + prefix.rows)[None, :]  # [1, Wp] prefix lengths
            hit = prefix.bits_at(np.broadcast_to(d, (len(arrs), d.shape[1])), starts[:, None])
            hit &= last.bits_at(lens[:, None] - d, starts[:, None] + d)
            ok |= hit.any(axis=1)
        return ok

    # ---------------------------------------------------------------- next-token distribution

    def next_token_logprobs(self, seq: Sequence[int]) -> np.ndarray:
        """True next-token log-distribution after every prefix of ``seq`` under uniform rule choice.

        Row ``t`` (``0 <= t <= len(seq)``) is ``log P(next | seq[:t])`` over ``[EOS, terminal 1, ..., num_sym]``:
        ``P(next = a | w) = Pre(w a) / Pre(w)`` and ``P(EOS | w) = P(w) / Pre(w)``, where ``P(w)`` is the probability
        that the grammar generates exactly ``w`` and ``Pre(w)`` the probability that it generates a sentence starting
        with ``w`` (so ``Pre(w) = P(w) + sum_a Pre(w a)`` and each row sums to one). Rows whose prefix has probability
        zero (not a prefix of any sentence) are NaN.

        Method, float64 log space throughout (sums are segment log-sum-exps, never Decimal):

        1. Inside pass, bottom-up: for each symbol the sparse list of spans ``[i, j)`` it derives with
           ``log P(s =>* seq[i:j])``; a rule ``s -> c1 .. cm`` of a symbol with ``R`` rules contributes
           ``log(1/R) + inside[c1] o ... o inside[cm]`` (``o`` = log-sum-exp over split points).
        2. Prefix ("outside from the left") pass, top-down: ``left[l](i, s)`` = log of the probability that the
           root derives ``seq[:i]`` followed by a level-``l`` symbol ``s`` whose yield starts at ``i`` (everything
           to its right unconstrained). ``left[0](0, root) = 0`` and for every rule ``s -> c1 .. cm`` and child
           ``k``: ``left[l+1](j, ck) += left[l](i, s) + log(1/R) + (inside[c1] o .. o inside[c(k-1)])(i, j)``.
           Because the grammar is layered (no recursion), each level is one vectorised step.
        3. ``Pre(seq[:t] a) = left[depth](t, a)`` (terminals are level ``depth``) and ``P(seq[:t]) =
           inside[root](0, t)``.

        Args:
          seq: terminal ids (``1..num_sym``), any length >= 0.
        Returns:
          ``[len(seq) + 1, 1 + num_sym]`` float64 log-probabilities.
        Raises:
          ValueError: if ``seq`` is not a 1-D integer sequence or an id is outside ``1..num_sym``.
        """
        x = _as_int_array(seq)
        if x is None:
            raise ValueError("CFG.next_token_logprobs: seq must be a 1-D sequence of ints")
        if x.size and (x.min() < 1 or x.max() > self.num_sym):
            raise ValueError(
                f"CFG.next_token_logprobs: token ids must be terminals 1..{self.num_sym}, got "
                f"{sorted(set(x[(x < 1) | (x > self.num_sym)].tolist()))}"
            )
        n = x.size
        base = n + 1  # span key = start * base + end
        pos = np.arange(n, dtype=np.int64)

        # 1. Inside pass. inside[l][s] = _LogSpans of symbol s of level l; prefixes[l][rule[:k]] = concatenation of
        # the first k children (children of level l + 1), memoised per level because rules share prefixes.
        inside = [None] * (self.depth + 1)
        prefixes = [None] * self.depth
        inside[self.depth] = [
            _LogSpans(pos[x == a + 1], pos[x == a + 1] + 1, np.zeros(int((x == a + 1).sum())))
            for a in range(self.num_sym)
        ]
        for lvl in range(self.depth - 1, -1, -1):
            children, cache = inside[lvl + 1], {}
            level = []
            for sym_rules in self.rules[lvl]:
                log_r = math.log(len(sym_rules))
                parts = [_log_prefix(children, rule, cache, base) for rule in sym_rules]
                level.append(_LogSpans.combine(parts, [-log_r] * len(parts), base))
            inside[lvl], prefixes[lvl] = level, cache

        # 2. Prefix pass. left[i, s] for the current level, positions 0..n.
        left = np.full((base, 1), _NEG_INF)
        left[0, 0] = 0.0
        for lvl in range(self.depth):
            n_child = self.sizes[lvl + 1]
            targets, values = [], []
            for s, sym_rules in enumerate(self.rules[lvl]):
                log_r = math.log(len(sym_rules))
                src = left[:, s] - log_r
                for rule in sym_rules:
                    # First child starts where its parent starts.
                    targets.append(np.arange(base) * n_child + rule[0])
                    values.append(src)
                    for k in range(1, len(rule)):
                        p = _log_prefix(inside[lvl + 1], rule[:k], prefixes[lvl], base)
                        targets.append(p.ends * n_child + rule[k])
                        values.append(src[p.starts] + p.logp)
            keys, vals = _segment_logsumexp(np.concatenate(targets), np.concatenate(values))
            left = np.full((base, n_child), _NEG_INF)
            left.reshape(-1)[keys] = vals

        # 3. Rows.
        logits = np.empty((base, 1 + self.num_sym))
        logits[:, 1:] = left
        logits[:, 0] = _NEG_INF
        root = inside[0][0]
        at_zero = root.starts == 0
        logits[root.ends[at_zero], 0] = root.logp[at_zero]
        norm = _logsumexp(logits, axis=1)
        with np.errstate(invalid="ignore"):
            out = logits - norm[:, None]
        out[~np.isfinite(norm)] = np.nan
        return out


@functools.cache
def _load_cached(name: str) -> CFG:
    if name not in CFG_NAMES:
        raise ValueError(f"CFG.load: unknown grammar {name!r}; valid names: {', '.join(CFG_NAMES)}")
    text = importlib.resources.files("canon_jax.data").joinpath("assets", "lano_cfgs", f"{name}.json").read_text()
    return CFG.from_dict(json.loads(text), name=name)


def _as_int_array(s):
    """1-D int64 array from a list/array of integers, or None if ``s`` is not one (ragged, 2-D, text, bool, ...)."""
    try:
        arr = np.asarray(s)
    except (TypeError, ValueError):
        return None
    if arr.ndim != 1:
        return None
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Membership DP on sorted span lists (fast when few spans are derivable, which is the usual case)
# ----------------------------------------------------------------------------------------------------------------

# A string whose span joins produce more than this many candidate spans per position goes to the bitset DP.
_SPARSE_SPAN_BUDGET = 8


class _OverBudget(Exception):
    """Raised by a span join when some strings produce too many candidate spans; ``strings`` lists them."""

    def __init__(self, strings: np.ndarray):
        super().__init__(f"{strings.size} strings over the span budget")
        self.strings = strings


class _Spans:
    """Spans ``[starts[k], ends[k])`` derived by one symbol, unique and sorted by (start, end)."""

    __slots__ = ("starts", "ends")

    def __init__(self, starts: np.ndarray, ends: np.ndarray):
        self.starts, self.ends = starts, ends

    @classmethod
    def from_keys(cls, keys: np.ndarray, base: int) -> _Spans:
        keys = np.unique(keys)
        return cls(keys // base, keys % base)

    @classmethod
    def union(cls, parts: list[_Spans], base: int) -> _Spans:
        if len(parts) == 1:
            return parts[0]
        return cls.from_keys(np.concatenate([p.starts * base + p.ends for p in parts]), base)


def _span_join(a: _Spans, b: _Spans, string_end: np.ndarray, budget: int) -> _Spans:
    """Spans of ``a b``: ``[i, j)`` for every ``[i, m)`` in ``a`` and ``[m, j)`` in ``b`` (within one string)."""
    lo = np.searchsorted(b.starts, a.ends, "left")
    hi = np.searchsorted(b.starts, a.ends, "right")
    counts = hi - lo
    total = int(counts.sum())
    if budget is not None:
        string_id, limit = budget
        per_string = np.bincount(string_id[a.starts], weights=counts, minlength=limit.size)
        over = np.flatnonzero(per_string > limit)
        if over.size:
            raise _OverBudget(over)
    if total == 0:
        empty = np.zeros(0, np.int64)
        return _Spans(empty, empty)
    ia = np.repeat(np.arange(a.starts.size), counts)
    ib = lo[ia] + (np.arange(total) - (np.cumsum(counts) - counts)[ia])
    i, j = a.starts[ia], b.ends[ib]
    keep = j <= string_end[i]
    return _Spans.from_keys(i[keep] * string_end.size + j[keep], string_end.size)


def _span_suffix(spans, rule, cache, string_end, budget):
    """Spans of the concatenation of ``rule``'s children (right fold, memoised per suffix)."""
    rule = tuple(rule)
    if len(rule) == 1:
        return spans[rule[0]]
    if rule not in cache:
        cache[rule] = _span_join(
            spans[rule[0]], _span_suffix(spans, rule[1:], cache, string_end, budget), string_end, budget
        )
    return cache[rule]


# ----------------------------------------------------------------------------------------------------------------
# Membership DP on packed bitsets
# ----------------------------------------------------------------------------------------------------------------


def _pack_bits(mask: np.ndarray, nw: int) -> np.ndarray:
    """Bool ``[n]`` -> ``[nw]`` uint64 with position ``p`` at bit ``p % 64`` of word ``p // 64``."""
    padded = np.zeros(nw * 64, bool)
    padded[: mask.size] = mask
    return np.packbits(padded, bitorder="little").view("<u8").astype(np.uint64)


def _shift_down(words: np.ndarray, s: int) -> np.ndarray:
    """Bitsets ``[rows, nw]`` moved so that bit ``p`` of the result is bit ``p + s`` of the input (zeros enter)."""
    q, r = divmod(s, 64)
    out = np.zeros_like(words)
    nw = words.shape[-1]
    if q >= nw:
        return out
    src = words[..., q:]
    if r == 0:
        out[..., : nw - q] = src
    else:
        out[..., : nw - q] = src >> np.uint64(r)
        out[..., : nw - q - 1] |= src[..., 1:] << np.uint64(64 - r)
    return out


class _BitTable:
    """For one symbol: ``bits[d, :]`` is the set of start positions ``p`` such that it derives ``x[p : p + lo + d]``."""

    __slots__ = ("lo", "bits")

    def __init__(self, lo: int, bits: np.ndarray):
        self.lo, self.bits = lo, bits

    @classmethod
    def empty(cls, lo: int, hi: int, nw: int) -> _BitTable:
        return cls(lo, np.zeros((max(hi - lo + 1, 0), nw), np.uint64))

    @property
    def rows(self) -> int:
        return self.bits.shape[0]

    def or_(self, other: _BitTable) -> None:
        """In-place union with ``other`` (rows outside this table's length range cannot be derived and are dropped)."""
        a0 = max(self.lo, other.lo)
        a1 = min(self.lo + self.rows, other.lo + other.rows)
        if a1 > a0:
            self.bits[a0 - self.lo : a1 - self.lo] |= other.bits[a0 - other.lo : a1 - other.lo]

    def bits_at(self, lengths: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Bool, broadcast shape of the inputs: does the symbol derive ``x[pos : pos + length]``?"""
        lengths, positions = np.broadcast_arrays(lengths, positions)
        row = lengths - self.lo
        valid = (row >= 0) & (row < self.rows)
        row = np.where(valid, row, 0)
        words = self.bits[row, positions >> 6] if self.rows else np.zeros(row.shape, np.uint64)
        return valid & (((words >> (positions & 63).astype(np.uint64)) & np.uint64(1)) == 1)


def _bit_concat(a: _BitTable, b: _BitTable, max_len: int) -> _BitTable:
    """Table of ``a b``: start ``p`` has length ``la + lb`` iff ``a`` derives ``[p, p+la)`` and ``b`` ``[p+la, ..)``."""
    lo = a.lo + b.lo
    hi = min(a.lo + a.rows - 1 + b.lo + b.rows - 1, max_len)
    out = _BitTable.empty(lo, hi, a.bits.shape[1])
    if out.rows == 0 or a.rows == 0 or b.rows == 0:
        return out
    nonempty = a.bits.any(axis=1)
    for da in np.flatnonzero(nonempty):
        la = a.lo + int(da)
        keep = min(b.rows, out.rows - int(da))
        if keep <= 0:
            break
        shifted = _shift_down(b.bits[:keep], la)
        shifted &= a.bits[da]
        out.bits[da : da + keep] |= shifted
    return out


def _concat_suffix(tables, rule, cache, max_len):
    """Table of the concatenation of ``rule``'s children, folded from the right and memoised per suffix."""
    rule = tuple(rule)
    if len(rule) == 1:
        return tables[rule[0]]
    if rule not in cache:
        cache[rule] = _bit_concat(tables[rule[0]], _concat_suffix(tables, rule[1:], cache, max_len), max_len)
    return cache[rule]


# ----------------------------------------------------------------------------------------------------------------
# Log-space DP for the next-token distribution
# ----------------------------------------------------------------------------------------------------------------


def _logsumexp(a: np.ndarray, axis) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m, axis=axis)


def _segment_logsumexp(keys: np.ndarray, values: np.ndarray):
    """Unique ``keys`` (sorted) and, for each, the log-sum-exp of the ``values`` sharing it (max-shifted, exact)."""
    finite = values > _NEG_INF
    keys, values = keys[finite], values[finite]
    if keys.size == 0:
        return keys, values
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    first = np.concatenate([[0], np.flatnonzero(np.diff(keys)) + 1])
    peak = np.maximum.reduceat(values, first)
    counts = np.diff(np.append(first, keys.size))
    total = np.add.reduceat(np.exp(values - np.repeat(peak, counts)), first)
    return keys[first], peak + np.log(total)


class _LogSpans:
    """Spans ``[starts[k], ends[k])`` with log-probabilities ``logp[k]``, unique and sorted by (start, end)."""

    __slots__ = ("starts", "ends", "logp")

    def __init__(self, starts: np.ndarray, ends: np.ndarray, logp: np.ndarray):
        self.starts, self.ends, self.logp = starts, ends, logp

    @classmethod
    def from_pairs(cls, keys: np.ndarray, values: np.ndarray, base: int) -> _LogSpans:
        keys, values = _segment_logsumexp(keys, values)
        return cls(keys // base, keys % base, values)

    @classmethod
    def combine(cls, parts: list[_LogSpans], offsets: list[float], base: int) -> _LogSpans:
        """Log of ``sum_k exp(offsets[k]) * parts[k]`` (a weighted union of span lists)."""
        keys = np.concatenate([p.starts * base + p.ends for p in parts])
        values = np.concatenate([p.logp + o for p, o in zip(parts, offsets)])
        return cls.from_pairs(keys, values, base)


def _log_join(a: _LogSpans, b: _LogSpans, base: int) -> _LogSpans:
    """``(a o b)(i, j) = log sum_m exp(a(i, m) + b(m, j))`` over the spans both lists hold."""
    lo = np.searchsorted(b.starts, a.ends, "left")
    hi = np.searchsorted(b.starts, a.ends, "right")
    counts = hi - lo
    total = int(counts.sum())
    if total == 0:
        empty = np.zeros(0, np.int64)
        return _LogSpans(empty, empty, np.zeros(0))
    ia = np.repeat(np.arange(a.starts.size), counts)
    ib = lo[ia] + (np.arange(total) - (np.cumsum(counts) - counts)[ia])
    return _LogSpans.from_pairs(a.starts[ia] * base + b.ends[ib], a.logp[ia] + b.logp[ib], base)


def _log_prefix(children, rule, cache, base):
    """Log-inside spans of the concatenation of ``rule``'s children (left fold, memoised per prefix)."""
    rule = tuple(rule)
    if len(rule) == 1:
        return children[rule[0]]
    if rule not in cache:
        cache[rule] = _log_join(_log_prefix(children, rule[:-1], cache, base), children[rule[-1]], base)
    return cache[rule]
