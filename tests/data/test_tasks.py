"""Generators vs independent checkers, distributions, determinism and parameter validation."""

import json
import math
import subprocess
import sys

import chex
import numpy as np
import pytest
import scipy.stats

from canon_jax.data import BOS, EOS, NUM_SPECIAL, PAD, TASK_NAMES, get_task, task_defaults
from canon_jax.data.capo import (
    NUM_TEMPLATES,
    SENTENCE_KINDS,
    attribute_values,
    people_table,
    templates,
    tokenize,
    word_vocabulary,
)
from canon_jax.data.rng import SplitMixRng, mix_key_continue, mix_keys_np, splitmix_uniform, splitmix_uniform_np
from canon_jax.eval.brevo import check_answer, prompt_of
from canon_jax.eval.mano import evaluate_prefix


# ---------------------------------------------------------------------------------------------------------- Depo
def _depo_official_check(task, sample, split):
    """Independent check on the official ids: a cycle of n distinct words, k-th successor answers, labels."""
    p = task.params
    mv, K = p["mini_vocab"], p["K"]
    off = task.to_official(sample.tokens)
    lab = sample.labels.tolist()
    assert off[0] == 9999 and lab[0] == 0
    # split into words (end token > mv) and control tokens
    i, edges_words = 1, []
    cur = []
    while off[i] < 9000 or off[i] == 9700:
        t = off[i]
        if t != 9700:
            assert 1 <= t <= 2 * mv
            cur.append(t)
            if t > mv:
                assert p["min_len"] <= len(cur) <= p["max_len"]
                edges_words.append(tuple(cur))
                cur = []
        i += 1
    assert not cur
    n = sample.meta["n"]
    assert len(edges_words) == 2 * n
    succ = {}
    for a, b in zip(edges_words[0::2], edges_words[1::2]):
        assert a not in succ
        succ[a] = b
    assert len(succ) == n and set(succ.values()) == set(succ)  # a permutation of n distinct words ...
    w0 = next(iter(succ))
    w, steps = succ[w0], 1
    while w != w0:
        w, steps = succ[w], steps + 1
    assert steps == n  # ... that is one single cycle
    if split == "test":
        assert n == p["N"]
    assert 3 <= n <= p["N"]
    ks, starts = [], []
    while i < len(off):
        k = off[i] - 9000
        assert 1 <= k <= K and lab[i] == 0
        i += 1
        q = []
        while off[i] != 9500:
            q.append(off[i])
            assert lab[i] == 0
            i += 1
        assert lab[i] == 1  # the answer marker is supervised
        i += 1
        a = []
        while i < len(off) and not 9000 < off[i] <= 9000 + K:
            a.append(off[i])
            assert lab[i] == 1
            i += 1
        truth = tuple(q)
        for _ in range(k):
            truth = succ[truth]
        assert tuple(a) == truth
        ks.append(k)
        starts.append(tuple(q))
    assert len(ks) == min(n, p["M"]) and len(set(starts)) == len(starts)
    assert ks == sample.meta["ks"]
    return n, ks


@pytest.mark.parametrize(
    "name,params",
    [("depo1", {}), ("depo2", {}), ("depo1", {"N": 20, "separator": True}), ("depo1", {"N": 12, "K": 11})],
)
def test_depo_answers_are_kth_successors(name, params):
    task = get_task(name, **params)
    n_train = 6 if not params else 40
    for i in range(n_train):
        _depo_official_check(task, task.sample(i, "train", 3), "train")
    test_ks = set()
    for i in range(3):
        _, ks = _depo_official_check(task, task.sample(i, "test", 3), "test")
        test_ks.update(ks)
    K = task.params["K"]
    allowed = {2**j for j in range(8) if 2**j <= K} | {K}
    assert test_ks <= allowed


def test_depo_test_k_set():
    from canon_jax.data.depo import test_hops

    assert test_hops(8) == [1, 2, 4, 8] and test_hops(16) == [1, 2, 4, 8, 16] and test_hops(11) == [1, 2, 4, 8, 11]


def _harmonic_probs(N):
    w = np.array([1.0 / (n + math.sqrt(N)) for n in range(3, N + 1)])
    return w / w.sum()


@pytest.mark.parametrize("name", ["depo1", "brevo1"])
def test_train_n_distribution_chi_square(name):
    N, draws = 16, 3000
    task = get_task(name, N=N, **({"K": 4, "M": 1} if name == "depo1" else {}))
    ns = np.array([task.sample(i, "train", 11).meta["n"] for i in range(draws)])
    counts = np.bincount(ns, minlength=N + 1)[3:]
    res = scipy.stats.chisquare(counts, _harmonic_probs(N) * draws)
    assert res.pvalue > 1e-3, res
    # and it is not the uniform law (the test has power against a wrong n law)
    assert scipy.stats.chisquare(counts).pvalue < 1e-3


def test_depo_k_uniform_train_and_test():
    task = get_task("depo1", N=10, K=8)
    ks = np.concatenate([task.sample(i, "train", 5).meta["ks"] for i in range(300)])
    assert scipy.stats.chisquare(np.bincount(ks, minlength=9)[1:]).pvalue > 1e-3
    kt = np.concatenate([task.sample(i, "test", 5).meta["ks"] for i in range(200)])
    c = np.array([np.sum(kt == k) for k in (1, 2, 4, 8)])
    assert c.sum() == kt.size and scipy.stats.chisquare(c).pvalue > 1e-3


# --------------------------------------------------------------------------------------------------------- Brevo
@pytest.mark.parametrize("name,params", [("brevo1", {}), ("brevo2", {}), ("brevo1", {"N": 12})])
def test_brevo_answers_valid_and_dag_shape(name, params):
    task = get_task(name, **params)
    for split, count in (("train", 30), ("test", 4)):
        for i in range(count):
            s = task.sample(i, split, 1)
            toks = s.tokens
            assert toks[0] == BOS and toks[-1] == EOS
            prompt = prompt_of(s)
            assert check_answer(task, prompt, toks[len(prompt) :])  # independent validity checker
            lab = s.labels
            assert lab[: len(prompt) - 1].sum() == 0 and lab[len(prompt) - 1 :].all()  # marker..EOS supervised
            if split == "test":
                assert s.meta["n"] == task.params["N"]
            if not task.params["multi_token"]:
                off = task.to_official(toks)
                q = off.index(9997)
                edges = off[1:q]
                nodes = set(edges)
                assert len(nodes) <= s.meta["n"] and max(nodes) <= task.params["N"]
                indeg, outdeg = {}, {}
                for a, b in zip(edges[0::2], edges[1::2]):
                    indeg[b] = indeg.get(b, 0) + 1
                    outdeg[a] = outdeg.get(a, 0) + 1
                assert max(indeg.values(), default=0) <= 4 and max(outdeg.values(), default=0) <= 4
                assert off[q + 2] == 9998 and off[-1] == 9998  # official ids: marker and EOS share 9998


def test_brevo_checker_rejects_bad_answers():
    task = get_task("brevo1", N=30)
    s = next(s for s in (task.sample(i, "test", 0) for i in range(50)) if s.meta["num_answer_nodes"] >= 3)
    p = prompt_of(s)
    ans = list(s.tokens[len(p) :])
    assert check_answer(task, p, ans)
    assert not check_answer(task, p, ans[:-1])  # no EOS
    assert not check_answer(task, p, ans[1:])  # missing node
    assert not check_answer(task, p, [ans[-2]] + ans[:-2] + [ans[-1]])  # query first: order violated
    assert not check_answer(task, p, ans[:1] + ans[:-1] + [EOS])  # duplicate
    assert not check_answer(task, p, [9999, -3] + ans)  # garbage ids


# ---------------------------------------------------------------------------------------------------------- Mano
@pytest.mark.parametrize("params", [{}, {"L": 4, "ops": "asmd", "knowledge_augment": False}, {"L": 3, "mod": 7}])
def test_mano_answers_match_independent_evaluation(params):
    task = get_task("mano", **params)
    L = task.params["L"]
    seen_len = []
    for split, count in (("train", 200), ("test", 50)):
        for i in range(count):
            s = task.sample(i, split, 2)
            off = task.to_official(s.tokens)
            value, n_ops = evaluate_prefix(task, s.tokens)
            assert off[-1] == 5000 + value == 5000 + s.meta["answer"]
            assert n_ops == s.meta["L"] and off[1] // 10 == n_ops and off[-2] // 10 == n_ops
            assert len(off) == 2 * n_ops + 5
            assert s.labels.tolist() == [0] * (len(off) - 1) + [1]
            if split == "test":
                assert n_ops == L
            else:
                seen_len.append(n_ops)
            if not task.params["knowledge_augment"]:
                assert off[0] == 9999 and off[1] % 10 == 0 and all(t >= 5000 or t <= 4 for t in off[2:-2])
    counts = np.bincount(seen_len, minlength=L + 1)[1:]
    assert scipy.stats.chisquare(counts).pvalue > 1e-3


def test_splitmix_stream_matches_published_reference():
    """The counter-based stream is SplitMix64: its first outputs for seed 1234567 are the published reference values
    (Rosetta Code "Pseudo-random numbers/Splitmix64"), so Mano's samples are the same on every machine."""
    ref = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431, 16408922859458223821]
    want = [(r >> 11) * 2.0**-53 for r in ref]
    assert [splitmix_uniform(1234567, j) for j in range(5)] == want
    rng = SplitMixRng(1234567)
    assert [rng.random() for _ in range(5)] == want
    keys = np.array([1234567, 0, 2**64 - 1], dtype=np.uint64)
    u = splitmix_uniform_np(keys, 5)
    chex.assert_shape(u, (3, 5))
    assert u[0].tolist() == want
    assert u[1:].tolist() == [[splitmix_uniform(int(k), j) for j in range(5)] for k in keys[1:]]
    idx = np.array([0, 7, 2**40 + 3])
    assert mix_keys_np(99, idx).tolist() == [mix_key_continue(99, int(i)) for i in idx]


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"L": 3, "ops": "m", "knowledge_augment": False},
        {"L": 1, "ops": "as"},
        {"ops": "asmd"},
        {"L": 6, "ops": "dm", "mod": 5},
    ],
)
def test_mano_vectorised_equals_scalar_path(params):
    """The block generator reproduces the one-sample reference path exactly (any index, split, seed, offset;
    with division, rows with zero-divisor redraws included)."""
    for offset in (None, 300):
        task = get_task("mano", offset=offset, **params)
        task.block_size = 64
        idx = list(range(0, 150)) + [1000, 10**12 + 5, 63, 64, 65]
        for split in ("train", "test"):
            for i in idx:
                a, b = task.sample(i, split, 3), task.sample_scalar(i, split, 3)
                assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.labels, b.labels), (split, i)
                assert a.meta == b.meta and a.tokens.dtype == np.int32 and a.labels.dtype == np.int8
        toks, lengths, ells, answers = task.generate_many(np.array([5, 1, 5]), "train", 3)
        chex.assert_shape(toks, (3, 2 * task.params["L"] + 5))
        chex.assert_shape([lengths, ells, answers], [(3,)] * 3)
        assert np.array_equal(toks[0], toks[2]) and (toks[0, lengths[0] :] == PAD).all()
        assert toks[1, : lengths[1]].tolist() == task.sample_scalar(1, "train", 3).tokens.tolist()
    if "d" in params.get("ops", ""):  # the zero-divisor redraw case is among the compared indices
        redrawn = 0
        for i in range(150):
            rng = SplitMixRng(task.key(i, "train", 3))
            _, _, meta = task._generate(i, "train", rng, seed=3)
            redrawn += rng._j > 2 + 2 * meta["L"] + 1  # more draws than nodes: a subtree was redrawn
        assert redrawn >= 3, redrawn
    with pytest.raises(ValueError, match=">= 0"):
        get_task("mano").generate_many([-1])


# ---------------------------------------------------------------------------------------------------------- Capo
def test_capo_bios_state_exactly_the_attributes():
    task = get_task("capo", num_people=300, people_seed=4)
    words = word_vocabulary()
    template_words = {
        w
        for kind in SENTENCE_KINDS
        for t in templates(kind)
        for w in tokenize(t.replace("{S}", " ").replace("{s}", " ").replace("{X}", " "))
    } | {"of"}
    for split in ("train", "test"):
        for i in range(40):
            s = task.sample(i, split, 0)
            m = s.meta
            text, attrs = m["text"], m["attributes"]
            assert s.tokens[0] == BOS and s.tokens[-1] == EOS and s.labels[0] == 0 and s.labels[1:].all()
            # decoded words equal the tokenised text
            assert [words[t - NUM_SPECIAL] for t in s.tokens[1:-1]] == tokenize(text)
            assert text.count(".") >= 6 and attrs["full_name"] in text
            for a in ("birthcity", "university", "field", "company1name", "company1city"):
                assert attrs[a] in text
                b, e = m["spans"][a]
                assert [words[t - NUM_SPECIAL] for t in s.tokens[b:e]] == tokenize(attrs[a])
            for a in ("birthyear", "birthmonth", "birthday"):
                b, e = m["spans"][a]
                assert [words[t - NUM_SPECIAL] for t in s.tokens[b:e]] == [attrs[a]]
            assert 1900 <= int(attrs["birthyear"]) <= 2099 and 1 <= int(attrs["birthday"]) <= 28
            pron = "He" if m["person"] % 2 == 0 else "She"
            assert pron in text or pron.lower() in text
            # exactly these facts: outside the 8 disjoint value spans only template words, the name and the
            # pronoun remain (no other person's or field value sneaks in)
            spans = sorted(m["spans"].values())
            assert len(spans) == 8 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
            covered = {j for b, e in spans for j in range(b, e)}
            rest = [words[t - NUM_SPECIAL] for j, t in enumerate(s.tokens[1:-1], start=1) if j not in covered]
            allowed = template_words | set(tokenize(attrs["full_name"])) | {pron, pron.lower()}
            assert set(rest) <= allowed, set(rest) - allowed
    # the company's city is its HQ city
    from canon_jax.data.capo import field_lists

    f = field_lists()
    s = task.sample(0, "test", 0)
    j = f["company"].index(s.meta["attributes"]["company1name"])
    assert s.meta["attributes"]["company1city"] == f["company_city"][j]


def test_capo_people_unique_and_exposures():
    N = 50
    task = get_task("capo", num_people=N, exposures=3)
    t = people_table(N, 0)
    names = set(zip(t["first_name"].tolist(), t["middle_name"].tolist(), t["last_name"].tolist()))
    assert len(names) == N
    # N*exposures consecutive train samples show every person exactly `exposures` times
    persons = [task.person_of(i, "train", 7) for i in range(N * 3)]
    assert np.bincount(persons, minlength=N).tolist() == [3] * N
    assert persons[:N] != persons[N : 2 * N]  # a fresh order per exposure
    assert [task.person_of(i, "test", 7) for i in range(N)] == list(range(N))
    assert all(v == 50 for v in NUM_TEMPLATES.values())
    # attributes are uniform over their value lists (docs/tasks.md, Capo people): chi-square on a larger table
    big = people_table(6000, 1)
    for attr, k in (("birthmonth", 12), ("birthday", 28), ("field", 100)):
        assert scipy.stats.chisquare(np.bincount(big[attr], minlength=k)).pvalue > 1e-3, attr
    assert big["birthyear"].min() >= 0 and big["birthyear"].max() < 200
    assert len(attribute_values("birthyear")) == 200


# ---------------------------------------------------------------------------------------------------------- Lano
def test_lano_strings_accepted_by_grammar():
    from canon_jax.data.lano_grammar import CFG

    names = list(CFG.names())
    assert len(names) == 9
    for cfg in names:
        task = get_task("lano", cfg=cfg)
        samples = [task.sample(i, split, 0) for split in ("train", "test") for i in range(2 if cfg != "cfg3f" else 6)]
        seqs = []
        for s in samples:
            off = task.to_official(s.tokens)
            assert off[0] == 9999 and off[-1] == task.cfg.eos_id and s.labels[0] == 0 and s.labels[1:].all()
            assert all(1 <= t <= task.cfg.num_sym for t in off[1:-1]) and s.meta["length"] == len(off) - 2
            seqs.append(off[1:-1])
        assert task.cfg.accepts(seqs).all(), cfg
    with pytest.raises(ValueError, match="valid cfgs"):
        get_task("lano", cfg="cfg9z")


def test_lano_blocks_keep_samples_pure_functions_of_index():
    """Sample i is row i % BLOCK of CFG.sample_batch seeded by its block's key: independent of access order, cache
    state and vocabulary placement; blocks and splits differ."""
    from canon_jax.data import lano as lano_mod
    from canon_jax.data.rng import numpy_rng

    B = lano_mod.BLOCK
    task = get_task("lano", cfg="cfg3b")
    idx = [0, 1, B - 1, B, 3 * B + 5, 10**9 + 7]
    fwd = [task.sample(i, "train", 4) for i in idx]
    fresh = get_task("lano", cfg="cfg3b", offset=50)
    fresh.cache_blocks = 1  # every call regenerates its block
    rev = [fresh.sample(i, "train", 4) for i in reversed(idx)][::-1]
    for i, a, b in zip(idx, fwd, rev):
        assert fresh.to_official(b.tokens) == task.to_official(a.tokens)
        b0 = i - i % B
        g = numpy_rng(mix_key_continue(task.key(b0, "train", 4), lano_mod._BLOCK_TAG))
        assert task.to_official(a.tokens)[1:-1] == task.cfg.sample_batch(g, B)[i % B]
    assert len({tuple(s.tokens.tolist()) for s in fwd}) == len(fwd)
    assert not np.array_equal(task.sample(0, "test", 4).tokens, fwd[0].tokens)
    with pytest.raises(ValueError, match=">= 0"):
        task.sample(-1)
    with pytest.raises(ValueError, match="multiple of"):
        task.block_strings(3, "train", 0)


# ------------------------------------------------------------------------------------------------ determinism etc.
_DIGEST_SCRIPT = """
import hashlib, sys
from canon_jax.data import get_task
h = hashlib.sha256()
for name, params in [("depo1", {"N": 30}), ("brevo2", {"N": 10}), ("mano", {}), ("capo", {"num_people": 20}),
                     ("lano", {"cfg": "cfg3b"}), ("mano", {"ops": "asmd"})]:
    t = get_task(name, **params)
    for split in ("train", "test"):
        for i in (0, 5, 123456789):
            h.update(t.sample(i, split, 9).tokens.tobytes())
print(h.hexdigest())
"""


def test_samples_are_pure_functions_of_index():
    t = get_task("depo1", N=30)
    a = [t.sample(i, "train", 9).tokens for i in (0, 5, 7)]
    b = [get_task("depo1", N=30).sample(i, "train", 9).tokens for i in (7, 5, 0)][::-1]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(t.sample(0, "train", 9).tokens, t.sample(0, "train", 10).tokens)
    assert not np.array_equal(t.sample(0, "train", 9).tokens, t.sample(1, "train", 9).tokens)
    # same digest in two fresh interpreters with different hash seeds (no dependence on hash() or process state)
    outs = [
        subprocess.run(
            [sys.executable, "-c", _DIGEST_SCRIPT],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(s), "PATH": "/usr/bin:/bin", "PYTHONPATH": "."},
        ).stdout
        for s in (1, 2)
    ]
    assert outs[0] == outs[1] and len(outs[0].strip()) == 64


@pytest.mark.parametrize(
    "name,params,msg",
    [
        ("depo1", {"N": 2}, "N must be >= 3"),
        ("depo1", {"K": 375}, "K must satisfy"),
        ("depo2", {"N": 300, "mini_vocab": 1}, "cannot form"),
        ("brevo1", {"N": 1}, "N must be >= 3"),
        ("mano", {"L": 0}, "L (number of operations) must be >= 1"),
        ("mano", {"ops": "asx"}, "ops must be"),
        ("mano", {"ops": "d", "mod": 10}, "prime"),
        ("depo1", {"bogus": 1}, "valid parameters"),
        ("capo", {"num_people": 0}, "num_people"),
        ("brevo1", {"mini_vocab": 9}, "only apply with multi_token"),
        ("mano", {"L": "abc"}, "expects int"),
    ],
)
def test_bad_params_raise_clear_errors(name, params, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        get_task(name, **params)


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="valid tasks"):
        get_task("depo3")
    assert set(TASK_NAMES) == {"depo1", "depo2", "brevo1", "brevo2", "capo", "mano", "lano"}
    assert task_defaults("depo2")["K"] == 16 and task_defaults("brevo2")["multi_token"]


def test_vocabulary_blocks_are_disjoint():
    from canon_jax.data import Vocabulary

    v = Vocabulary(["depo1", ("mano", {"L": 4}), {"name": "brevo1", "params": {"N": 20}}, "depo1", "capo"])
    ranges = [(t.offset, t.vocab_end) for t in v._by_key.values()]
    assert ranges[0][0] == NUM_SPECIAL and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert v.size == ranges[-1][1] and v.tasks[0] is v.tasks[3]
    for t in v._by_key.values():
        toks = np.concatenate([t.sample(i, "train", 0).tokens for i in range(5)])
        own = toks[toks >= NUM_SPECIAL]
        assert own.min() >= t.offset and own.max() < t.vocab_end and PAD not in toks
    m = v.task("mano", L=4)
    assert m.to_official(m.sample(0, "test", 0).tokens) == get_task("mano", L=4).to_official(
        get_task("mano", L=4).sample(0, "test", 0).tokens
    )  # placement does not change the sample


@pytest.mark.parametrize("name", TASK_NAMES)
def test_sample_shapes_and_dtypes(name):
    import chex

    params = {"capo": {"num_people": 30}}.get(name, {})
    task = get_task(name, **params)
    for split in ("train", "test"):
        s = task.sample(1, split, 0)
        n = len(s)
        chex.assert_shape([s.tokens, s.labels], (n,))
        assert s.tokens.dtype == np.int32 and s.labels.dtype == np.int8
        # Mano's knowledge augmentation starts half of its samples with the BOS alias (official 9998)
        assert s.tokens[0] == BOS or (name == "mano" and task.to_official(s.tokens[:1]) == [9998])
        assert s.labels.sum() >= 1 and set(np.unique(s.labels)) <= {0, 1}
        assert s.tokens.min() >= 1 and s.tokens.max() < task.vocab_end
        json.dumps(s.meta)  # meta is JSON-serialisable (the CLI dumps it)
