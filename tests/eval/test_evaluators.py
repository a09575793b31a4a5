"""Evaluators with a perfect oracle (accuracy 1), wrong models (accuracy ~0) and malformed outputs (scored wrong)."""

import math

import numpy as np
import pytest

from canon_jax.data import EOS, DataConfig, get_task
from canon_jax.eval import evaluate
from canon_jax.eval.brevo import parse_prompt


def _onehot_next(x, V, shift=0, scale=50.0):
    """Teacher-forcing 'model' whose row t puts all mass on token x[t+1] (+shift): a perfect predictor (shift=0)."""
    nxt = np.concatenate([x[:, 1:], np.zeros((x.shape[0], 1), x.dtype)], 1)
    out = np.zeros(x.shape + (V,), np.float32)
    np.put_along_axis(out, ((nxt + shift) % V)[..., None].astype(np.int64), scale, -1)
    return out


@pytest.mark.parametrize("name,params", [("depo1", {"N": 30}), ("depo2", {"N": 20})])
def test_depo_oracle_and_wrong(name, params):
    V = get_task(name, **params).vocab_end
    good = evaluate(name, params, logits_fn=lambda x: _onehot_next(x, V), num_samples=6, batch_size=4)
    ks = [1, 2, 4, 8] + ([16] if name == "depo2" else [])
    assert good["accuracy"] == 1.0 and all(good[f"accuracy_k{k}"] == 1.0 for k in ks)
    assert sum(good[f"count_k{k}"] for k in ks) == 60
    bad = evaluate(name, params, logits_fn=lambda x: _onehot_next(x, V, shift=1), num_samples=6, batch_size=4)
    assert bad["accuracy"] == 0.0
    nan = evaluate(
        name, params, logits_fn=lambda x: np.full(x.shape + (V,), np.nan, np.float32), num_samples=2, batch_size=2
    )
    assert nan["accuracy"] == 0.0


def test_depo_one_wrong_answer_token_fails_the_query():
    V = get_task("depo2", N=20).vocab_end

    def almost(x):  # perfect except at the last position of every sequence (the last answer's last token)
        out = _onehot_next(x, V)
        n = (x != 0).sum(1)
        for r in range(x.shape[0]):
            out[r, n[r] - 2] = np.roll(out[r, n[r] - 2], 1)
        return out

    r = evaluate("depo2", {"N": 20}, logits_fn=almost, num_samples=4, batch_size=4)
    assert r["accuracy"] == pytest.approx(36 / 40)


def test_mano_oracle_wrong_and_mix_vocab():
    cfg = DataConfig(tasks=[{"name": "depo1", "params": {"N": 20}}, {"name": "mano", "params": {"L": 5}}])
    V = cfg.vocab_size()
    good = evaluate("mano", {"L": 5}, logits_fn=lambda x: _onehot_next(x, V), num_samples=10, batch_size=4, vocab=cfg)
    assert good["accuracy"] == 1.0 and good["count"] == 10
    bad = evaluate(
        "mano", {"L": 5}, logits_fn=lambda x: _onehot_next(x, V, shift=3), num_samples=10, batch_size=4, vocab=cfg
    )
    assert bad["accuracy"] == 0.0
    with pytest.raises(ValueError, match="not part of this vocabulary"):
        evaluate("mano", {"L": 6}, logits_fn=lambda x: _onehot_next(x, V), num_samples=1, batch_size=1, vocab=cfg)
    with pytest.raises(ValueError, match="needs logits_fn"):
        evaluate("mano", {}, num_samples=1, batch_size=1)
    with pytest.raises(ValueError, match="valid tasks"):
        evaluate("mano3", {}, num_samples=1, batch_size=1)


def _alt_topo(parents, query):
    """A topological order of query's ancestors built differently from the generator (DFS post-order, largest
    parent first) — valid but in general not the generator's order."""
    out, seen = [], set()

    def visit(v):
        if v in seen:
            return
        seen.add(v)
        for p in sorted(parents.get(v, ()), reverse=True):
            visit(p)
        out.append(v)

    visit(query)
    return out


def _brevo_oracle(task, *, garbage_after_eos=True, drop_eos=False, out_offset=None):
    off = task.offset if out_offset is None else out_offset
    words_code = lambda w: [off + t - 1 for t in w]  # noqa: E731  word values -> global ids
    diffs = []

    def gen(prompts, mask, max_new, rng):
        assert prompts.dtype == np.int32 and mask.dtype == bool and prompts.shape == mask.shape
        out = (
            np.full((prompts.shape[0], max_new), 7, np.int32)
            if garbage_after_eos
            else np.zeros((prompts.shape[0], max_new), np.int32)
        )
        for r in range(prompts.shape[0]):
            parents, q = parse_prompt(task, prompts[r][mask[r]])
            seq = [c for v in _alt_topo(parents, q) for c in words_code(v)] + ([] if drop_eos else [EOS])
            out[r, : len(seq)] = seq
            diffs.append(seq)
        return out

    return gen, diffs


@pytest.mark.parametrize("name,params", [("brevo1", {"N": 25}), ("brevo2", {"N": 12})])
def test_brevo_oracle_accepts_other_valid_orders(name, params):
    task = get_task(name, **params)
    gen, produced = _brevo_oracle(task)
    r = evaluate(name, params, generate_fn=gen, num_samples=6, batch_size=4)
    assert r["accuracy"] == 1.0 and r["count"] == 6
    # at least one oracle answer differs from the generator's own order: exact match would have failed it
    refs = [list(task.sample(i, "test", 0).tokens) for i in range(6)]
    assert any(not any(ref[-len(p) :] == p for ref in refs) for p in produced)


def test_brevo_in_a_task_mix_uses_the_mix_ids():
    cfg = DataConfig(tasks=[{"name": "mano"}, {"name": "brevo2", "params": {"N": 10}}])
    task = cfg.vocabulary().task("brevo2", N=10)
    assert task.offset > 6
    gen, _ = _brevo_oracle(task)
    assert evaluate("brevo2", {"N": 10}, generate_fn=gen, num_samples=4, batch_size=2, vocab=cfg)["accuracy"] == 1.0
    alone, _ = _brevo_oracle(task, out_offset=6)  # right answers, but in stand-alone ids: foreign to the mix
    assert evaluate("brevo2", {"N": 10}, generate_fn=alone, num_samples=4, batch_size=2, vocab=cfg)["accuracy"] == 0.0


def test_brevo_wrong_and_malformed_outputs_score_zero():
    task = get_task("brevo1", N=25)
    gen, _ = _brevo_oracle(task, drop_eos=True, garbage_after_eos=False)
    assert evaluate("brevo1", {"N": 25}, generate_fn=gen, num_samples=4, batch_size=4)["accuracy"] == 0.0
    rng = np.random.default_rng(0)
    rand = lambda p, m, n, k: rng.integers(-5, 40, (p.shape[0], n)).astype(np.int32)  # noqa: E731
    assert evaluate("brevo1", {"N": 25}, generate_fn=rand, num_samples=4, batch_size=4)["accuracy"] == 0.0
    short = lambda p, m, n, k: np.zeros((p.shape[0], 3), np.int32)  # noqa: E731  wrong width
    with pytest.warns(RuntimeWarning, match="scored wrong"):
        assert evaluate("brevo1", {"N": 25}, generate_fn=short, num_samples=2, batch_size=2)["accuracy"] == 0.0
    ragged = lambda p, m, n, k: [[1, 2], [3]]  # noqa: E731  not an array
    with pytest.warns(RuntimeWarning, match="scored wrong"):
        assert evaluate("brevo1", {"N": 25}, generate_fn=ragged, num_samples=2, batch_size=2)["accuracy"] == 0.0
    floats = lambda p, m, n, k: np.zeros((p.shape[0], n), np.float32)  # noqa: E731  wrong dtype
    assert evaluate("brevo1", {"N": 25}, generate_fn=floats, num_samples=2, batch_size=2)["accuracy"] == 0.0


@pytest.mark.parametrize("name,params", [("depo1", {"N": 20}), ("mano", {"L": 4}), ("capo", {"num_people": 10})])
def test_malformed_logits_are_scored_wrong_not_errors(name, params):
    V = get_task(name, **params).vocab_end
    for bad in (
        lambda x: np.zeros((x.shape[0], 3, V), np.float32),  # wrong length
        lambda x: np.zeros(x.shape, np.float32),  # no vocabulary axis
        lambda x: np.full(x.shape + (V,), "a"),  # not numbers
        lambda x: [[1.0], [2.0, 3.0]],
    ):  # ragged
        with pytest.warns(RuntimeWarning, match="scored wrong"):
            out = evaluate(name, params, logits_fn=bad, num_samples=3, batch_size=2)
        acc = out["value_accuracy"] if name == "capo" else out["accuracy"]
        assert acc == 0.0, (name, out)
    # a vocabulary axis too small to hold the answer ids: wrong, no error
    small = evaluate(
        name, params, logits_fn=lambda x: np.zeros(x.shape + (2,), np.float32), num_samples=2, batch_size=2
    )
    assert (small["value_accuracy"] if name == "capo" else small["accuracy"]) == 0.0


def test_capo_oracle_wrong_and_bits():
    params = {"num_people": 40}
    task = get_task("capo", **params)
    V = task.vocab_end
    good = evaluate(
        "capo", params, logits_fn=lambda x: _onehot_next(x, V), num_samples=12, batch_size=4, num_params=1000
    )
    assert good["value_accuracy"] == 1.0 and good["first_token_accuracy"] == 1.0
    assert good["bits_accuracy"] == pytest.approx(good["bits_max"])
    assert good["bits_loss"] == pytest.approx(good["bits_max"], rel=1e-6)
    assert good["bits_per_param_loss"] == pytest.approx(good["bits_loss"] / 1000)
    # bits_max = N * sum log2 |V_a| over the seven independent attributes
    expect = 40 * sum(math.log2(s) for s in (200, 12, 28, 200, 300, 100, 263))
    assert good["bits_max"] == pytest.approx(expect)
    bad = evaluate("capo", params, logits_fn=lambda x: _onehot_next(x, V, shift=1), num_samples=12, batch_size=4)
    assert bad["value_accuracy"] == 0.0 and bad["bits_loss"] == 0.0 and bad["bits_accuracy"] == 0.0
    uni = evaluate(
        "capo", params, logits_fn=lambda x: np.zeros(x.shape + (V,), np.float32), num_samples=4, batch_size=4
    )
    assert uni["loss_bits/birthyear"] == pytest.approx(math.log2(V)) and uni["bits_loss"] == 0.0


def test_capo_per_attribute_scores_match_reference_checker():
    """A model right on some attributes and wrong on others: the evaluator's per-attribute value accuracy equals a
    loop that decodes the greedy value words and asks the reference checker ``check_attribute``."""
    from canon_jax.eval.capo import ALL_ATTRIBUTES, check_attribute

    params = {"num_people": 16}
    task = get_task("capo", **params)
    V = task.vocab_end
    samples = [task.sample(i, "test", 0) for i in range(8)]
    spans = {tuple(s.tokens.tolist()): s.meta["spans"] for s in samples}
    broken = {"birthcity": 0, "university": 1, "birthyear": 0}  # attribute -> which value token is predicted wrong

    def model(x):
        out = _onehot_next(x, V)
        for r, row in enumerate(x):
            key = next((k for k in spans if list(k) == row[: len(k)].tolist()), None)
            if key is None:
                continue
            for a, j in broken.items():
                b, e = spans[key][a]
                if j < e - b:  # corrupt the prediction of value token j (row b + j - 1 predicts token b + j)
                    out[r, b + j - 1] = np.roll(out[r, b + j - 1], 1)
        return out

    res = evaluate("capo", params, logits_fn=model, num_samples=8, batch_size=3)
    for a in ALL_ATTRIBUTES:
        ref = []
        for s in samples:
            b, e = s.meta["spans"][a]
            am = np.argmax(model(s.tokens[None])[0], -1)
            words = [task.code_name(int(c)) for c in task.to_codes(am[b - 1 : e - 1])]
            ref.append(check_attribute(task, s.meta["person"], a, words))
        assert res[f"value_accuracy/{a}"] == pytest.approx(np.mean(ref)), a
    assert res["value_accuracy/birthcity"] == 0.0 and res["value_accuracy/field"] == 1.0
    p0 = task.person(3)
    assert check_attribute(task, 3, "birthcity", p0["birthcity"]) and not check_attribute(task, 3, "birthcity", "x")
    assert not check_attribute(task, 3, "birthyear", [p0["birthyear"], "1"]) and not check_attribute(
        task, 3, "field", []
    )
    with pytest.raises(ValueError, match="valid attributes"):
        check_attribute(task, 3, "shoe_size", "9")


def test_lano_registry_calls_lano_evaluator():
    pytest.importorskip("canon_jax.eval.lano", reason="Lano evaluator (lano branch) not merged yet")
    task = get_task("lano", cfg="cfg3b")
    count = [0]

    def oracle(prompts, mask, max_new, rng):  # replays true grammar strings (+ EOS) in the task's ids
        out = np.full((prompts.shape[0], max_new), EOS, np.int32)
        for r in range(prompts.shape[0]):
            s = task.sample(count[0], "test", 99).tokens[1:]
            count[0] += 1
            out[r, : len(s)] = s
        return out

    good = evaluate("lano", {"cfg": "cfg3b"}, generate_fn=oracle, num_samples=4, batch_size=2)
    assert good["gen_accuracy"] == 1.0
    eos_only = lambda p, m, n, k: np.full((p.shape[0], n), EOS, np.int32)  # noqa: E731  empty strings
    assert evaluate("lano", {"cfg": "cfg3b"}, generate_fn=eos_only, num_samples=4, batch_size=2)["gen_accuracy"] == 0.0

    # KL: a model whose logits are the grammar's true next-token log-probabilities scores KL = 0; uniform does not
    term = np.array([task.sample_token(t) for t in range(1, task.cfg.num_sym + 1)])
    V = task.vocab_end

    def true_logits(x):
        out = np.full(x.shape + (V,), -1e9, np.float32)
        for r in range(x.shape[0]):
            w = []
            for tok in x[r, 1:]:
                if tok not in term:
                    break
                w.append(int(np.nonzero(term == tok)[0][0]) + 1)
            lp = task.cfg.next_token_logprobs(w)
            blk = out[r, : len(w) + 1]
            blk[:, EOS] = lp[:, 0]
            blk[:, term] = lp[:, 1:]
        return out

    kl_true = evaluate("lano", {"cfg": "cfg3b"}, logits_fn=true_logits, num_samples=2, batch_size=2)["kl"]
    kl_flat = evaluate(
        "lano", {"cfg": "cfg3b"}, logits_fn=lambda x: np.zeros(x.shape + (V,), np.float32), num_samples=2, batch_size=2
    )["kl"]
    assert abs(kl_true) < 1e-9 and kl_flat > 0.05
