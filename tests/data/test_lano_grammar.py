"""Lano grammars: loading, sampling, membership and the true next-token distribution.

Independent references written here: a dictionary-based CYK over (start -> ends) sets and a log-space inside
algorithm over the same dictionaries (plain Python), an exhaustive enumeration of every derivation of small
hand-made grammars, and the exact first-token distribution from the grammar's leftmost paths.
"""

import itertools
import json
import math
from collections import defaultdict

import chex
import numpy as np
import pytest

from canon_jax.data.lano_grammar import CFG

METHODS = ("auto", "sparse", "bitset")


def make_cfg(levels, num_sym):
    """A grammar in the official JSON structure: ``levels[l][s]`` = rules of symbol ``s`` of level ``l``."""
    sizes = [len(level) for level in levels] + [num_sym]
    return CFG.from_dict(
        {
            "depth": len(levels),
            "num_sym": num_sym,
            "eos_token": num_sym + 1,
            "sizes": sizes,
            "all": [[{"children": rules} for rules in level] for level in levels] + [[{"children": None}] * num_sym],
        },
        name="tiny",
    )


# Depth 2, two terminals, a length-1 rule and ambiguity (11 sentences).
TINY2 = make_cfg([[[[0, 1], [1, 0, 1], [2]]], [[[0, 1], [1]], [[1, 1, 0], [0]], [[0, 0]]]], 2)
# Depth 3, three terminals, rule lengths 1..4, ambiguous (thousands of sentences up to length 21).
TINY3 = make_cfg(
    [
        [[[0, 1, 2], [1, 0], [2, 2, 2, 1]]],
        [[[0, 1], [1, 0, 1], [2]], [[1, 1], [0, 2, 0]], [[2], [0, 1]]],
        [[[0, 1], [1]], [[1, 1, 0], [0]], [[0, 0], [2, 1]]],
    ],
    3,
)


# ---------------------------------------------------------------------------------------------------- references


def ref_spans(g, seq):
    """Per root-level symbol, dict start -> set of ends (plain-Python CYK, level by level)."""
    spans = [defaultdict(set) for _ in range(g.num_sym)]
    for i, t in enumerate(seq):
        if 1 <= t <= g.num_sym:
            spans[t - 1][i].add(i + 1)
    for lvl in range(g.depth - 1, -1, -1):
        new = []
        for rules in g.rules[lvl]:
            acc = defaultdict(set)
            for rule in rules:
                cur = {i: set(e) for i, e in spans[rule[0]].items()}
                for c in rule[1:]:
                    nxt = defaultdict(set)
                    for i, ends in cur.items():
                        for m in ends:
                            nxt[i].update(spans[c].get(m, ()))
                    cur = nxt
                for i, e in cur.items():
                    acc[i].update(e)
            new.append(acc)
        spans = new
    return spans[0]


def ref_accepts(g, seq):
    seq = list(seq)
    if not seq or any(not (isinstance(t, (int, np.integer)) and 1 <= t <= g.num_sym) for t in seq):
        return False
    return len(seq) in ref_spans(g, seq).get(0, ())


def ref_log_prob(g, seq):
    """log P(root =>* seq) by a plain-Python log-space inside pass over span dictionaries."""

    def lse(vals):
        m = max(vals)
        return m + math.log(sum(math.exp(v - m) for v in vals))

    tabs = [{(i, i + 1): 0.0 for i, t in enumerate(seq) if t == a + 1} for a in range(g.num_sym)]
    for lvl in range(g.depth - 1, -1, -1):
        new = []
        for rules in g.rules[lvl]:
            acc = defaultdict(list)
            for rule in rules:
                cur = dict(tabs[rule[0]])
                for c in rule[1:]:
                    by_start = defaultdict(list)
                    for (m, j), v in tabs[c].items():
                        by_start[m].append((j, v))
                    nxt = defaultdict(list)
                    for (i, m), v in cur.items():
                        for j, w in by_start.get(m, ()):
                            nxt[(i, j)].append(v + w)
                    cur = {k: lse(v) for k, v in nxt.items()}
                for k, v in cur.items():
                    acc[k].append(v - math.log(len(rules)))
            new.append({k: lse(v) for k, v in acc.items()})
        tabs = new
    return tabs[0].get((0, len(seq)), -math.inf)


def enumerate_sentences(g):
    """Every sentence of a small grammar with its probability (sum over all its derivations)."""

    def expand(lvl, sym):
        if lvl == g.depth:
            return {(sym + 1,): 1.0}
        out = defaultdict(float)
        rules = g.rules[lvl][sym]
        for rule in rules:
            for combo in itertools.product(*[list(expand(lvl + 1, c).items()) for c in rule]):
                sentence = sum((c[0] for c in combo), ())
                out[sentence] += math.prod(c[1] for c in combo) / len(rules)
        return out

    return dict(expand(0, 0))


def prefix_masses(sentences):
    """Pre(w) = total probability of the sentences starting with w, for every non-empty prefix w."""
    prefix_mass = defaultdict(float)
    for s, p in sentences.items():
        for t in range(1, len(s) + 1):
            prefix_mass[s[:t]] += p
    return prefix_mass


def brute_next(g, sentences, prefix_mass, seq):
    """[len + 1, 1 + num_sym] next-token probabilities by summing over the enumerated sentences (NaN if impossible)."""
    rows = []
    for t in range(len(seq) + 1):
        w = tuple(seq[:t])
        row = [sentences.get(w, 0.0)] + [prefix_mass.get(w + (a,), 0.0) for a in range(1, g.num_sym + 1)]
        total = sum(row)
        rows.append([r / total if total > 0 else np.nan for r in row])
    return np.array(rows)


def corruptions(g, rng, seq):
    """Substitution, insertion, deletion, truncation, swap and a random string of the same length."""
    n = len(seq)
    i = int(rng.integers(n))
    sub = list(seq)
    sub[i] = sub[i] % g.num_sym + 1
    j = int(rng.integers(n - 1))
    swap = list(seq)
    swap[j], swap[j + 1] = swap[j + 1], swap[j]
    return [
        sub,
        seq[:i] + [int(rng.integers(1, g.num_sym + 1))] + seq[i:],
        seq[:i] + seq[i + 1 :],
        seq[: int(rng.integers(1, n))],
        swap,
        [int(v) for v in rng.integers(1, g.num_sym + 1, n)],
    ]


# ---------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", CFG.names())
def test_load_matches_json(name):
    import importlib.resources

    raw = json.loads(
        importlib.resources.files("canon_jax.data").joinpath("assets", "lano_cfgs", f"{name}.json").read_text()
    )
    g = CFG.load(name)
    assert g is CFG.load(name)  # cached
    assert (g.depth, g.num_sym, g.eos_id) == (raw["depth"], raw["num_sym"], raw["eos_token"])
    assert list(g.sizes) == raw["sizes"]
    assert [list(level) for level in g.symbol_ids] == raw["idx"]
    for lvl in range(g.depth):
        for s, sym in enumerate(raw["all"][lvl]):
            assert [list(r) for r in g.rules[lvl][s]] == sym["children"]
            assert all(1 <= len(r) <= 3 for r in sym["children"])
    assert g.min_len <= g.max_len


def test_names_and_bad_inputs():
    assert CFG.names() == ("cfg3b", "cfg3e1", "cfg3e2", "cfg3f", "cfg3g", "cfg3h", "cfg3i", "cfg3j", "cfg3k")
    with pytest.raises(ValueError, match="unknown grammar 'cfg9'.*cfg3f"):
        CFG.load("cfg9")
    good = {
        "depth": 1,
        "num_sym": 2,
        "eos_token": 3,
        "sizes": [1, 2],
        "all": [[{"children": [[0, 1]]}], [{"children": None}] * 2],
    }
    CFG.from_dict(good)
    with pytest.raises(ValueError, match="missing field 'sizes'"):
        CFG.from_dict({k: v for k, v in good.items() if k != "sizes"})
    with pytest.raises(ValueError, match=r"indexes outside level 1 \(size 2\)"):
        CFG.from_dict({**good, "all": [[{"children": [[0, 2]]}], good["all"][1]]})
    with pytest.raises(ValueError, match="empty rule"):
        CFG.from_dict({**good, "all": [[{"children": [[]]}], good["all"][1]]})
    with pytest.raises(ValueError, match="eos_token 2 collides with terminal ids 1..2"):
        CFG.from_dict({**good, "eos_token": 2})
    with pytest.raises(ValueError, match="exactly one"):
        CFG.from_dict({**good, "sizes": [2, 2]})


# ---------------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", CFG.names())
def test_samples_accepted_by_every_method_and_reference(name):
    g = CFG.load(name)
    rng = np.random.default_rng(0)
    seqs = [g.sample(rng) for _ in range(3)]
    assert all(g.min_len <= len(s) <= g.max_len and set(s) <= set(range(1, g.num_sym + 1)) for s in seqs)
    for method in METHODS:
        np.testing.assert_array_equal(g.accepts(seqs, method=method), True)
    assert all(ref_accepts(g, s) for s in seqs)


def test_sample_ancestors():
    g = CFG.load("cfg3f")
    tokens = g.sample(np.random.default_rng(3))
    tokens2, anc = g.sample(np.random.default_rng(3), return_ancestors=True)
    assert tokens2 == tokens
    chex.assert_shape(anc, (len(tokens), g.depth))
    assert (anc[:, 0] == 0).all()
    for t, tok in enumerate(tokens):
        chain = list(anc[t]) + [tok - 1]  # root .. level depth-1 symbol, then the terminal index
        for lvl in range(g.depth):
            assert 0 <= chain[lvl] < g.sizes[lvl]
            assert any(chain[lvl + 1] in rule for rule in g.rules[lvl][chain[lvl]]), (t, lvl)
    # Tokens under one level-1 ancestor are contiguous: the level-1 index changes at most (rule length - 1) times.
    assert np.count_nonzero(np.diff(anc[:, 1])) <= max(len(r) for r in g.rules[0][0]) - 1


def test_samplers_follow_the_grammar_distribution():
    """Sentence frequencies of both samplers on TINY2 match the enumerated probabilities (5-sigma binomial bands)."""
    probs = enumerate_sentences(TINY2)
    rng = np.random.default_rng(7)
    for draws in (TINY2.sample_batch(rng, 20000), [TINY2.sample(rng) for _ in range(4000)]):
        counts = defaultdict(int)
        for d in draws:
            counts[tuple(d)] += 1
        assert set(counts) <= set(probs)
        for sent, p in probs.items():
            sigma = math.sqrt(p * (1 - p) / len(draws))
            assert abs(counts[sent] / len(draws) - p) < 5 * sigma + 1e-9, (sent, p, counts[sent] / len(draws))


@pytest.mark.parametrize("name", ["cfg3f", "cfg3e1", "cfg3k"])
def test_sample_batch_real_grammars(name):
    g = CFG.load(name)
    seqs, anc = g.sample_batch(np.random.default_rng(0), 6, return_ancestors=True)
    assert len(seqs) == 6 and g.accepts(seqs).all()
    for s, a in zip(seqs, anc):
        chex.assert_shape(a, (len(s), g.depth))
        for t, tok in enumerate(s):
            chain = list(a[t]) + [tok - 1]
            assert all(any(chain[lvl + 1] in r for r in g.rules[lvl][chain[lvl]]) for lvl in range(g.depth))
    assert g.sample_batch(np.random.default_rng(0), 0) == []
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        g.sample_batch(np.random.default_rng(0), -1)


# ---------------------------------------------------------------------------------------------------- membership


@pytest.mark.parametrize("name", CFG.names())
def test_corrupted_strings_match_reference(name):
    g = CFG.load(name)
    rng = np.random.default_rng(1)
    seqs = []
    for _ in range(3 if name in ("cfg3f", "cfg3b") else 2):  # cfg3j/cfg3k strings are twice as long
        s = g.sample(rng)
        seqs += [s] + corruptions(g, rng, s)
    # Periodic strings derive many spans (the auto method hands them to the bitset DP).
    seqs += [[1, 2] * 90, [1] * 150, [1, 2, 3] * 60]
    want = np.array([ref_accepts(g, s) for s in seqs])
    assert 2 <= want.sum() < len(seqs)  # both verdicts occur
    for method in METHODS:
        got = g.accepts(seqs, method=method)
        chex.assert_shape(got, (len(seqs),))
        np.testing.assert_array_equal(got, want, err_msg=method)


@pytest.mark.parametrize("g", [TINY2, TINY3], ids=["depth2", "depth3"])
def test_tiny_grammars_exhaustive(g):
    """Every string up to length 7 (and every sentence) is accepted iff it is an enumerated sentence."""
    sentences = enumerate_sentences(g)
    strings = [list(s) for s in sentences]
    for n in range(1, 8):
        strings += [list(t) for t in itertools.product(range(1, g.num_sym + 1), repeat=n)]
    want = np.array([tuple(s) in sentences for s in strings])
    for method in METHODS:
        np.testing.assert_array_equal(g.accepts(strings, method=method), want, err_msg=method)
    assert sum(sentences.values()) == pytest.approx(1.0)


def test_accepts_malformed_inputs():
    g = CFG.load("cfg3f")
    good = g.sample(np.random.default_rng(2))
    bad = [
        [],
        [0] + good[1:],
        good[:-1] + [g.eos_id],
        good + [g.eos_id],
        [-1] * len(good),
        [99],
        "abc",
        [[1, 2], [3]],
        [1.5] * 80,
        None,
    ]
    got = g.accepts([good, np.array(good, np.int32), np.array(good, np.float64)] + bad)
    np.testing.assert_array_equal(got, [True, True, True] + [False] * len(bad))
    chex.assert_shape(g.accepts([]), (0,))
    with pytest.raises(ValueError, match="1-D array"):
        g.accepts(np.array(good))
    with pytest.raises(ValueError, match="method must be one of"):
        g.accepts([good], method="cyk")


def test_accepts_many_strings_in_chunks(monkeypatch):
    import canon_jax.data.lano_grammar as lg

    monkeypatch.setattr(lg, "_ACCEPT_CHUNK_POSITIONS", 500)  # force several chunks
    g = CFG.load("cfg3g")
    rng = np.random.default_rng(4)
    seqs, want = [], []
    for _ in range(12):
        s = g.sample(rng)
        seqs += [s, s[:-1]]
        want += [True, ref_accepts(g, s[:-1])]
    np.testing.assert_array_equal(g.accepts(seqs), want)


# ---------------------------------------------------------------------------------------------------- next token


@pytest.mark.parametrize("g", [TINY2, TINY3], ids=["depth2", "depth3"])
def test_next_token_matches_brute_force(g):
    sentences = enumerate_sentences(g)
    prefix_mass = prefix_masses(sentences)
    rng = np.random.default_rng(0)
    keys = list(sentences)
    picks = [keys[i] for i in rng.choice(len(keys), min(25, len(keys)), replace=False)]
    picks += [(), (1,), (2, 2, 2), (1, 2, 1, 1)]
    for s in picks:
        got = g.next_token_logprobs(list(s))
        chex.assert_shape(got, (len(s) + 1, 1 + g.num_sym))
        want = brute_next(g, sentences, prefix_mass, list(s))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        ok = ~np.isnan(want)
        np.testing.assert_allclose(np.exp(got[ok]), want[ok], rtol=1e-10, atol=1e-14)
        finite_rows = ~np.isnan(got).any(axis=1)
        np.testing.assert_allclose(np.exp(got[finite_rows]).sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("name", ["cfg3f", "cfg3k", "cfg3e2"])
def test_next_token_real_grammars(name):
    g = CFG.load(name)
    s = g.sample(np.random.default_rng(5))
    lp = g.next_token_logprobs(s)
    chex.assert_shape(lp, (len(s) + 1, 1 + g.num_sym))
    assert lp.dtype == np.float64
    np.testing.assert_allclose(np.exp(lp).sum(axis=1), 1.0, rtol=1e-12)
    # Chain rule: prod_t P(s_t | s_<t) * P(EOS | s) = P(s), with P(s) from the independent inside pass.
    chain = lp[np.arange(len(s)), s].sum() + lp[len(s), 0]
    assert chain == pytest.approx(ref_log_prob(g, s), abs=1e-9)

    # Row 0 = distribution of the first token: average over rules along the leftmost path.
    def first(lvl, sym):
        if lvl == g.depth:
            return np.eye(g.num_sym)[sym]
        return np.mean([first(lvl + 1, r[0]) for r in g.rules[lvl][sym]], axis=0)

    np.testing.assert_allclose(np.exp(lp[0, 1:]), first(0, 0), rtol=1e-12, atol=1e-15)
    assert lp[0, 0] == -np.inf  # the empty string is not a sentence
    # A corrupted string: rows after the first impossible prefix are NaN, earlier rows stay distributions.
    bad = list(s)
    for i in range(len(bad) // 2, len(bad)):
        bad[i] = bad[i] % g.num_sym + 1
        if not ref_accepts(g, bad):
            break
    lpb = g.next_token_logprobs(bad)
    dead = np.isnan(lpb).any(axis=1)
    assert dead.any() and np.array_equal(dead, np.cumsum(dead) > 0)  # NaN from some row on
    first_dead = int(np.argmax(dead))
    assert lpb[first_dead - 1, bad[first_dead - 1]] == -np.inf  # the token that broke it had probability 0


def test_next_token_bad_ids():
    g = CFG.load("cfg3f")
    with pytest.raises(ValueError, match=r"terminals 1\.\.3, got \[0, 4\]"):
        g.next_token_logprobs([1, 0, 4])
    with pytest.raises(ValueError, match="1-D sequence"):
        g.next_token_logprobs([[1, 2]])
