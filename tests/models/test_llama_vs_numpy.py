"""CausalLM (loaded through save_hf_checkpoint -> load_hf_checkpoint) vs the float64 numpy reference of np_llama."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from canon_jax.config import ModelConfig
from canon_jax.interop import load_hf_checkpoint, save_hf_checkpoint
from canon_jax.models import CausalLM
from tests.models import np_llama
from tests.models.helpers import random_params

TINY = dict(vocab_size=41, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)

CASES = {
    "partial_rope_hf_qknorm_ABCD": dict(rope_dim=4, rope_version="huggingface", qk_norm=True, canon_set="ABCD"),
    "partial_rope_lingua_AC": dict(rope_dim=4, rope_version="lingua", canon_set="AC", rope_theta=500.0),
    "full_rope_lingua_qknorm_mha": dict(rope_version="lingua", qk_norm=True, canon_set="ABCD", num_kv_heads=None),
    "nope_tied_BD": dict(rope_dim=0, tie_embeddings=True, canon_set="BD"),
    "k3_activation_bias_nores_tied": dict(
        canon_kernel=3,
        canon_activation=True,
        canon_bias=True,
        canon_residual=False,
        canon_set="ABCD",
        tie_embeddings=True,
    ),
    "no_canon": dict(canon_set=""),
}


def write_random_checkpoint(tmp_path, config, seed=0):
    model = CausalLM(config)
    params = random_params(model, seed)
    save_hf_checkpoint(model, params, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        hf_cfg = json.load(f)
    return params, hf_cfg, load_file(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_float64_reference(tmp_path, case):
    config = ModelConfig(**{**TINY, **CASES[case]})
    _, hf_cfg, tensors = write_random_checkpoint(tmp_path, config, seed=len(case))
    model, params = load_hf_checkpoint(str(tmp_path))
    ids = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, 11)).astype(np.int32)
    logits = jax.jit(model.apply)({"params": params}, ids)
    chex.assert_shape(logits, (2, 11, config.vocab_size))
    ref = np_llama.forward(hf_cfg, tensors, ids)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-4, rtol=1e-4)


def test_left_padding_matches_reference_with_mask(tmp_path):
    """token_mask: padded tokens are invisible (attention keys masked, Canon inputs zeroed), positions shifted."""
    config = ModelConfig(**{**TINY, "canon_set": "ABCD", "rope_dim": 4})
    _, hf_cfg, tensors = write_random_checkpoint(tmp_path, config, seed=3)
    model, params = load_hf_checkpoint(str(tmp_path))
    rng = np.random.default_rng(2)
    ids = rng.integers(0, config.vocab_size, size=(2, 10)).astype(np.int32)
    mask = np.ones((2, 10), bool)
    mask[1, :4] = False
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    logits = jax.jit(model.apply)({"params": params}, ids, positions=positions, token_mask=mask)
    chex.assert_shape(logits, (2, 10, config.vocab_size))
    ref = np_llama.forward(hf_cfg, tensors, ids, mask=mask)
    np.testing.assert_allclose(np.asarray(logits)[mask], ref[mask], atol=2e-4, rtol=1e-4)
    # and the padded row equals the same row without its padding
    alone = jax.jit(model.apply)({"params": params}, ids[1:, 4:])
    np.testing.assert_allclose(np.asarray(logits)[1, 4:], np.asarray(alone)[0], atol=1e-5)


def test_gradient_matches_finite_differences_of_float64_reference(tmp_path):
    """JAX autodiff (float32) of the mean NLL vs central differences of the float64 numpy reference."""
    config = ModelConfig(**{**TINY, "num_layers": 1, "canon_set": "ABCD", "qk_norm": True, "rope_dim": 4})
    _, hf_cfg, tensors = write_random_checkpoint(tmp_path, config, seed=5)
    model, params = load_hf_checkpoint(str(tmp_path))
    rng = np.random.default_rng(4)
    ids = rng.integers(0, config.vocab_size, size=(1, 8)).astype(np.int32)
    targets = rng.integers(0, config.vocab_size, size=(1, 8)).astype(np.int32)

    def loss(p):
        logits = model.apply({"params": p}, ids)
        logz = jax.nn.logsumexp(logits, -1)
        return jnp.mean(logz - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])

    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # (jax path, HF tensor, index in the HF tensor, index in our layout)
    probes = [
        (("layers_0", "mixer", "q_proj", "kernel"), "model.layers.0.self_attn.q_proj.weight", (3, 5), (5, 3)),
        (("layers_0", "mixer", "canon_b", "kernel"), "model.layers.0.self_attn.canonB.weight", (40, 0, 2), (2, 40)),
        (("layers_0", "mixer", "k_norm", "scale"), "model.layers.0.self_attn.k_norm.weight", (7,), (7,)),
        (("layers_0", "canon_a", "kernel"), "model.layers.0.canonA.weight", (1, 0, 3), (3, 1)),
        (("layers_0", "mlp", "canon_d", "kernel"), "model.layers.0.mlp.canonD.weight", (60, 0, 1), (1, 60)),
        (("layers_0", "mlp", "down_proj", "kernel"), "model.layers.0.mlp.down_proj.weight", (2, 30), (30, 2)),
        (("embed", "embedding"), "model.embed_tokens.weight", (int(ids[0, 2]), 4), (int(ids[0, 2]), 4)),
        (("lm_head", "kernel"), "lm_head.weight", (int(targets[0, 0]), 9), (9, int(targets[0, 0]))),
    ]
    eps = 1e-4
    for path, hf_name, hf_idx, our_idx in probes:
        g = grads
        for k in path:
            g = g[k]
        plus, minus = dict(tensors), dict(tensors)
        for store, sign in ((plus, 1.0), (minus, -1.0)):
            t = np.array(tensors[hf_name], np.float64)
            t[hf_idx] += sign * eps
            store[hf_name] = t
        fd = (
            np_llama.cross_entropy(np_llama.forward(hf_cfg, plus, ids), targets)
            - np_llama.cross_entropy(np_llama.forward(hf_cfg, minus, ids), targets)
        ) / (2 * eps)
        np.testing.assert_allclose(float(g[our_idx]), fd, rtol=2e-3, atol=2e-5, err_msg=str(path))
