"""GDN2 mixer: float64 numpy re-implementation from the parameters, decoding, token masks, inits."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.config import ModelConfig
from canon_jax.layers.gdn import GDNMixer
from tests.layers.test_gla import (
    B,
    D,
    H,
    T,
    check_decode_and_token_mask,
    check_init_stats,
    init,
    make_x,
    np_params,
    output_np,
    perturb,
    qkv_np,
    random_variables,
)
from tests.ops.test_gdn import oracle as gdn_oracle


def gdn_mixer_np(p, cfg, x):
    h = cfg.num_heads
    q, k, v = qkv_np(p, cfg, x)
    beta = 1.0 / (1.0 + np.exp(-(x @ p["b_proj"]["kernel"])))
    a_in = x @ p["a_proj"]["kernel"] + p["dt_bias"]
    log_decay = -np.exp(p["A_log"]) * np.logaddexp(0.0, a_in)
    r = lambda a: a.reshape(a.shape[0], a.shape[1], h, -1)
    o, _ = gdn_oracle(r(q), r(k), r(v), log_decay, beta, (cfg.key_dim // h) ** -0.5, None, True)
    return output_np(p, cfg, x, o)


@pytest.mark.parametrize("canon_set", ["", "bB"])
def test_matches_numpy(canon_set):
    cfg = ModelConfig(arch="gdn", hidden_size=D, num_heads=H, canon_set=canon_set, linear_chunk_size=8)
    mixer = GDNMixer(cfg)
    x = make_x()
    if canon_set:
        variables = init(mixer, x)
        check_gdn_init(nn.unbox(variables["params"]))
        variables = perturb(variables)
    else:
        variables = random_variables(mixer, x)
    y = jax.jit(mixer.apply)(variables, x)
    chex.assert_shape(y, (B, T, D))
    expected = gdn_mixer_np(np_params(variables), cfg, np.asarray(x, np.float64))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_decode_and_token_mask():
    cfg = ModelConfig(arch="gdn", hidden_size=D, num_heads=H, canon_set="bB", linear_chunk_size=8)
    mixer = GDNMixer(cfg)
    x = make_x()
    variables = random_variables(mixer, x)
    check_decode_and_token_mask(mixer, variables, x)


def check_gdn_init(params):
    check_init_stats(params)
    # A = exp(A_log) ~ U(0, 16); softplus(dt_bias) = dt in [1e-3, 0.1]
    a = np.exp(params["A_log"])
    assert np.all((a > 0) & (a <= 16))
    dt = np.logaddexp(0.0, np.asarray(params["dt_bias"], np.float64))
    assert np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))


def test_param_shapes():
    d, h = 256, 4
    cfg = ModelConfig(arch="gdn", hidden_size=d, num_heads=h, canon_set="b")
    params = nn.unbox(jax.eval_shape(GDNMixer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 1, d)))["params"])
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes["q_proj"]["kernel"] == (d, d) and shapes["v_proj"]["kernel"] == (d, 2 * d)
    assert shapes["b_proj"]["kernel"] == (d, h) and shapes["a_proj"]["kernel"] == (d, h)
    assert shapes["A_log"] == (h,) and shapes["dt_bias"] == (h,)
    assert shapes["g_proj"] == {"down": (d, 16), "up": (16, 2 * d), "bias": (2 * d,)}
    assert "gk_proj" not in shapes and "canon_b" not in shapes
