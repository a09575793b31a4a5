"""Lano evaluator: a perfect model (the grammar itself) scores accuracy 1 and KL ~ 0, a uniform model scores low
accuracy and the KL computed independently here; malformed generations are scored invalid without crashing."""

import math

import chex
import numpy as np
import pytest

from canon_jax.data.lano_grammar import CFG
from canon_jax.eval.lano import LanoTokenMap, evaluate_lano, kl_true_vs_model, parse_generations

# A compact vocabulary unrelated to the grammar's own ids: 0 pad, 1 BOS, 2 EOS, 3..5 terminals 1..3, 6..9 other tasks.
VOCAB = 10
TMAP = LanoTokenMap(bos_id=1, eos_id=2, terminal_ids=(3, 4, 5))


def perfect_fns(cfg, tmap):
    """A model that is the grammar: generation = grammar samples, logits = the true next-token log-probs."""
    inverse = {m: k + 1 for k, m in enumerate(tmap.terminal_ids)}

    def generate_fn(prompts, prompt_mask, max_new_tokens, rng):
        assert prompts.shape[1] == 1 and (prompts == tmap.bos_id).all() and prompt_mask.all()
        seed = int(np.asarray(__import__("jax").random.key_data(rng)).sum())
        gen = np.random.default_rng(seed)
        out = np.zeros((prompts.shape[0], max_new_tokens), np.int32)  # pad id 0 after EOS
        for b in range(prompts.shape[0]):
            s = list(tmap.encode(cfg.sample(gen)))[: max_new_tokens - 1] + [tmap.eos_id]
            out[b, : len(s)] = s
        return out

    def logits_fn(tokens):
        logits = np.full(tokens.shape + (VOCAB,), 5.0)  # junk in the non-Lano columns: must be ignored
        for b, row in enumerate(tokens):
            body = []
            for t in row[1:]:
                if int(t) not in inverse:
                    break
                body.append(inverse[int(t)])
            lp = cfg.next_token_logprobs(body)
            logits[b, : len(body) + 1][:, tmap.columns] = lp + 7.0  # any per-row shift is renormalised away
        return logits

    return generate_fn, logits_fn


def test_perfect_model_scores_one_and_zero_kl():
    cfg = CFG.load("cfg3f")
    gen, logits = perfect_fns(cfg, TMAP)
    out = evaluate_lano(
        "cfg3f",
        token_map=TMAP,
        generate_fn=gen,
        logits_fn=logits,
        num_samples=6,
        batch_size=4,
        max_new_tokens=cfg.max_len + 1,
        seed=3,
    )
    assert out["gen_accuracy"] == 1.0 and out["num_generated"] == 6 and out["num_accepted"] == 6
    assert out["num_no_eos"] == 0 and out["num_foreign"] == 0
    assert out["num_kl_strings"] == 6 and out["num_kl_generated_strings"] == 6
    assert out["num_kl_positions"] == sum(len(s) + 1 for s in cfg.sample_batch(np.random.default_rng(3), 6))
    for key in ("kl", "kl_pooled", "kl_max", "kl_generated", "kl_generated_pooled", "kl_generated_max"):
        assert abs(out[key]) < 1e-12, key
    # KL on fresh grammar strings (logits only), with the official smoothing: still zero for a perfect model.
    out2 = evaluate_lano(
        "cfg3f",
        token_map=dict(bos_id=1, eos_id=2, terminal_ids=[3, 4, 5]),
        logits_fn=logits,
        num_samples=3,
        batch_size=2,
        max_new_tokens=8,
        kl_epsilon=1e-5,
    )
    assert out2["num_kl_strings"] == 3 and "gen_accuracy" not in out2 and "kl_generated" not in out2
    assert abs(out2["kl"]) < 1e-12
    # A model with a 64-token context: strings are scored on their first 64 positions, still exactly.
    seen = []
    out3 = evaluate_lano(
        "cfg3f",
        token_map=TMAP,
        logits_fn=lambda t: seen.append(t.shape) or logits(t),
        num_samples=3,
        batch_size=3,
        max_new_tokens=8,
        max_length=64,
        seed=5,
    )
    assert seen == [(3, 64)] and out3["num_kl_positions"] == 3 * 64 and abs(out3["kl"]) < 1e-12


def test_uniform_model_low_accuracy_and_exact_kl():
    g = CFG.load("cfg3h")

    def gen(prompts, mask, n, rng):
        return np.random.default_rng(0).integers(0, VOCAB, (prompts.shape[0], n)).astype(np.int32)

    def flat(tokens):
        return np.zeros(tokens.shape + (VOCAB,), np.float32)

    out = evaluate_lano(
        g,
        token_map=TMAP,
        generate_fn=gen,
        logits_fn=flat,
        num_samples=16,
        batch_size=8,
        max_new_tokens=64,
        kl_on="grammar",
        seed=1,
    )
    assert out["gen_accuracy"] == 0.0 and out["num_generated"] == 16
    assert out["num_accepted"] == 0 and out["num_no_eos"] + out["num_foreign"] > 0
    # Independent KL: the model is uniform over the 4 columns, so KL_t = sum_c p log(4 p) = log 4 - H(p_t).
    per_string = []
    for s in g.sample_batch(np.random.default_rng(1), 16):  # the evaluator's grammar strings for seed=1
        p = np.exp(g.next_token_logprobs(s))
        ent = [-sum(v * math.log(v) for v in row if v > 0) for row in p]
        per_string.append(np.mean([math.log(4) - h for h in ent]))
    assert out["kl"] == pytest.approx(np.mean(per_string), rel=1e-10)
    assert out["kl"] > 0.1


def test_malformed_generations_are_invalid_not_errors():
    cfg = CFG.load("cfg3b")
    s = TMAP.encode(cfg.sample(np.random.default_rng(0)))
    rows = [
        list(s) + [TMAP.eos_id, 0, 0],  # valid
        list(s) + [0, 0, 0],  # no EOS
        list(s[:5]) + [7] + list(s[5:]) + [TMAP.eos_id],  # foreign token (another task's id)
        [TMAP.eos_id] + [0] * (len(s) + 2),  # empty string
        list(s[:-1]) + [TMAP.bos_id, TMAP.eos_id, 0, 0],  # BOS inside
    ]
    n = len(s) + 3
    tokens = np.array([r[:n] + [0] * (n - len(r)) for r in rows], np.int32)
    strings, status = parse_generations(tokens, TMAP)
    assert status == ["ok", "no_eos", "foreign", "ok", "foreign"]
    assert strings[3] == [] and strings[1] is None

    def gen(prompts, mask, max_new, rng):
        chex.assert_shape(prompts, (5, 1))
        return tokens

    out = evaluate_lano("cfg3b", token_map=TMAP, generate_fn=gen, num_samples=5, batch_size=5, max_new_tokens=n)
    assert out["gen_accuracy"] == pytest.approx(1 / 5)
    assert (out["num_no_eos"], out["num_foreign"], out["num_accepted"]) == (1, 2, 1)
    assert "kl" not in out
    # KL on the one accepted generation; with no accepted generation the keys are present and NaN.
    flat = lambda t: np.zeros(t.shape + (VOCAB,))  # noqa: E731
    out = evaluate_lano(
        "cfg3b", token_map=TMAP, generate_fn=gen, num_samples=5, batch_size=5, max_new_tokens=n, logits_fn=flat
    )
    assert out["num_kl_generated_strings"] == 1 and out["num_kl_generated_positions"] == len(s) + 1
    assert out["num_kl_strings"] == 5 and np.isfinite(out["kl"]) and np.isfinite(out["kl_generated"])
    floats = evaluate_lano(
        "cfg3b",
        token_map=TMAP,
        generate_fn=lambda p, m, k, r: tokens.astype(np.float32),
        num_samples=5,
        batch_size=5,
        max_new_tokens=n,
        logits_fn=flat,
        kl_on="generated",
    )
    assert floats["gen_accuracy"] == 0.0 and floats["num_kl_generated_strings"] == 0
    assert math.isnan(floats["kl_generated"]) and "kl" not in floats


def test_kl_true_vs_model_matches_loop():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=6)
    p[2, 1] = 0.0
    p[2] /= p[2].sum()
    logits = rng.normal(size=(6, 4))
    with np.errstate(divide="ignore"):
        log_p = np.log(p)
    kl = kl_true_vs_model(log_p, logits)
    chex.assert_shape(kl, (6,))
    for t in range(6):
        q = np.exp(logits[t]) / np.exp(logits[t]).sum()
        want = sum(p[t, c] * math.log(p[t, c] / q[c]) for c in range(4) if p[t, c] > 0)
        assert kl[t] == pytest.approx(want, rel=1e-12)
        eps = 1e-5
        ps, qs = (p[t] + eps) / (1 + 4 * eps), (q + eps) / (1 + 4 * eps)
        assert kl_true_vs_model(log_p[t : t + 1], logits[t : t + 1], epsilon=eps)[0] == pytest.approx(
            float(np.sum(ps * np.log(ps / qs))), rel=1e-10
        )
    np.testing.assert_allclose(kl_true_vs_model(log_p, log_p + 3.0), 0.0, atol=1e-15)


def test_argument_errors():
    fn = lambda *a: None  # noqa: E731
    with pytest.raises(ValueError, match="distinct"):
        LanoTokenMap(1, 1, (3, 4, 5))
    with pytest.raises(ValueError, match="num_sym = 3"):
        evaluate_lano("cfg3f", token_map=LanoTokenMap(1, 2, (3, 4)), logits_fn=fn, max_new_tokens=8)
    with pytest.raises(ValueError, match="missing \\['eos_id'\\]"):
        evaluate_lano("cfg3f", token_map={"bos_id": 1, "terminal_ids": (3, 4, 5)}, logits_fn=fn, max_new_tokens=8)
    with pytest.raises(ValueError, match="give generate_fn, logits_fn or both"):
        evaluate_lano("cfg3f", token_map=TMAP, max_new_tokens=8)
    with pytest.raises(ValueError, match="kl_on must be 'grammar', 'generated' or 'both'"):
        evaluate_lano("cfg3f", token_map=TMAP, logits_fn=fn, max_new_tokens=8, kl_on="model")
    with pytest.raises(ValueError, match="needs both generate_fn and logits_fn"):
        evaluate_lano("cfg3f", token_map=TMAP, logits_fn=fn, max_new_tokens=8, kl_on="both")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluate_lano("cfg3f", token_map=TMAP, logits_fn=fn, max_new_tokens=8, batch_size=0)
    with pytest.raises(ValueError, match="unknown grammar"):
        evaluate_lano("cfg0", token_map=TMAP, logits_fn=fn, max_new_tokens=8)


def test_malformed_output_shapes_are_scored_not_errors():
    """Wrong-shaped or non-array generations are invalid strings; wrong-shaped logits (or too few vocabulary
    columns, or non-numbers) give KL = inf for their batch; a RuntimeWarning names the problem."""
    with pytest.warns(RuntimeWarning, match=r"generate_fn must return \[batch=2, N\]"):
        out = evaluate_lano(
            "cfg3b",
            token_map=TMAP,
            generate_fn=lambda p, m, n, r: np.zeros((1, n), np.int32),
            num_samples=2,
            batch_size=2,
            max_new_tokens=8,
        )
    assert out["gen_accuracy"] == 0.0 and out["num_generated"] == 2
    with pytest.warns(RuntimeWarning):
        out = evaluate_lano(
            "cfg3b",
            token_map=TMAP,
            generate_fn=lambda p, m, n, r: [[1, 2], [3]],
            num_samples=3,
            batch_size=2,
            max_new_tokens=8,
        )
    assert out["gen_accuracy"] == 0.0 and out["num_generated"] == 3
    for bad in (
        lambda t: np.zeros(t.shape + (4,)),  # vocabulary too small for the terminal ids
        lambda t: np.zeros((1,) + t.shape[1:] + (VOCAB,)),  # wrong batch
        lambda t: "not logits",
    ):
        with pytest.warns(RuntimeWarning, match="KL = inf"):
            out = evaluate_lano("cfg3b", token_map=TMAP, logits_fn=bad, num_samples=3, batch_size=2, max_new_tokens=8)
        assert out["kl"] == math.inf and out["num_kl_strings"] == 3
