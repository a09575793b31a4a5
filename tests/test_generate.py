"""Cached generation: official greedy outputs, equality with full recomputation, left padding, sampling."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import canon_jax
from canon_jax.config import ModelConfig
from canon_jax.generate import generate
from canon_jax.interop import load_hf_checkpoint
from canon_jax.models import CausalLM, init_cache
from tests.models.helpers import random_params


@pytest.fixture(scope="module")
def official(refs_dir):
    d = refs_dir / "llama_canon" / "canon_abcd"
    model, params = load_hf_checkpoint(str(d))
    return model, params, np.load(d / "greedy.npz")


def test_greedy_matches_official(official):
    model, params, ref = official
    n = ref["generated_ids"].shape[1]
    tokens, logits = canon_jax.generate(model, params, ref["prompt_ids"], n, return_logits=True)
    chex.assert_shape(tokens, ref["generated_ids"].shape)
    chex.assert_shape(logits, ref["step_logits"].shape)
    assert tokens.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(tokens), ref["generated_ids"])
    np.testing.assert_allclose(np.asarray(logits), ref["step_logits"], atol=1e-4, rtol=0)


def _full_recompute_greedy(model, params, prompt, n, mask=None):
    """Greedy decoding without any cache: re-run the whole sequence for every new token.

    The sequence lives in a fixed [batch, P + n] buffer (the model is causal, so the not-yet-written tail cannot
    affect the logits read at the last written position); one compilation serves every step.
    """
    b, p = prompt.shape
    mask = np.ones((b, p + n), bool) if mask is None else np.concatenate([mask, np.ones((b, n), bool)], 1)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    apply = jax.jit(lambda ids: model.apply({"params": params}, ids, positions=positions, token_mask=mask))
    seq = np.zeros((b, p + n), np.int32)
    seq[:, :p] = prompt
    out, logits = [], []
    for i in range(n):
        lg = np.asarray(apply(seq))[:, p + i - 1]
        tok = lg.argmax(-1).astype(np.int32)
        out.append(tok)
        logits.append(lg)
        seq[:, p + i] = tok
    return np.stack(out, 1), np.stack(logits, 1)


@pytest.mark.parametrize(
    "kw",
    [
        dict(canon_set="ABCD", rope_dim=4, qk_norm=True),
        dict(
            canon_set="ABCD",
            canon_kernel=3,
            canon_activation=True,
            scan_layers=True,
            remat="full",
            tie_embeddings=True,
            rope_version="lingua",
        ),
    ],
)
def test_cache_equals_full_recomputation(kw):
    config = ModelConfig(
        vocab_size=53, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, **kw
    )
    model = CausalLM(config)
    params = random_params(model, 1)
    prompt = np.random.default_rng(0).integers(0, 53, size=(3, 5)).astype(np.int32)
    tokens, logits = generate(model, params, prompt, 7, return_logits=True)
    chex.assert_shape(tokens, (3, 7))
    chex.assert_shape(logits, (3, 7, 53))
    ref_tokens, ref_logits = _full_recompute_greedy(model, params, prompt, 7)
    np.testing.assert_array_equal(np.asarray(tokens), ref_tokens)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4, rtol=1e-4)


def test_left_padded_prompts(official):
    """Left padding: the padded row decodes like an uncached masked forward (padding invisible, positions from 0 at
    the first real token), and the unpadded row is unaffected by its neighbour's padding."""
    model, params, ref = official
    padded = ref["prompt_ids"].copy()
    padded[1, :3] = 7  # junk tokens under the mask
    mask = np.ones(padded.shape, bool)
    mask[1, :3] = False
    tokens, logits = generate(model, params, padded, 6, prompt_mask=mask, return_logits=True)
    chex.assert_shape(tokens, (2, 6))
    chex.assert_shape(logits, (2, 6, model.config.vocab_size))
    np.testing.assert_array_equal(np.asarray(tokens)[0], ref["generated_ids"][0, :6])
    ref_tokens, ref_logits = _full_recompute_greedy(model, params, padded, 6, mask=mask)
    np.testing.assert_array_equal(np.asarray(tokens), ref_tokens)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4, rtol=1e-4)


def test_sampling(official):
    model, params, ref = official
    prompts = ref["prompt_ids"]
    a = generate(model, params, prompts, 5, temperature=1.0, rng=jax.random.key(3))
    b = generate(model, params, prompts, 5, temperature=1.0, rng=jax.random.key(3))
    chex.assert_shape(a, (2, 5))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # deterministic given the key
    assert int(jnp.min(a)) >= 0 and int(jnp.max(a)) < model.config.vocab_size
    # top_k=1 sampling is greedy whatever the temperature
    top1 = generate(model, params, prompts, 5, temperature=2.0, top_k=1, rng=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(top1), ref["generated_ids"][:, :5])


def test_init_cache_shapes():
    config = ModelConfig(
        vocab_size=11, hidden_size=16, num_layers=2, num_heads=2, canon_set="ABCD", intermediate_size=24
    )
    cache = init_cache(CausalLM(config), 3, 9)
    layer = cache["layers_1"]
    chex.assert_shape(layer["mixer"]["cached_key"], (3, 9, 2, 8))
    chex.assert_shape(layer["canon_a"]["state"], (3, 16, 4))
    chex.assert_shape(layer["mixer"]["canon_b"]["state"], (3, 48, 4))
    chex.assert_shape(layer["mlp"]["canon_d"]["state"], (3, 48, 4))
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(cache))


def test_bad_arguments(official):
    model, params, ref = official
    p = ref["prompt_ids"]
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, p, 0)
    with pytest.raises(ValueError, match="rng"):
        generate(model, params, p, 2, temperature=0.5)
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(model, params, p, 2, prompt_mask=np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="top_k"):
        generate(model, params, p, 2, temperature=1.0, top_k=0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, params, p[0], 2)
