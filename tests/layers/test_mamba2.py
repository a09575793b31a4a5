"""Mamba2 mixer: float64 numpy re-implementation from the parameters (with conv1d, Canon-B, and the noconv1d
ablation), decoding, token masks, inits."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.config import ModelConfig
from canon_jax.layers.mamba2 import Mamba2Mixer, mamba2_dims
from tests.layers.test_gla import (
    B,
    D,
    H,
    T,
    check_decode_and_token_mask,
    conv_np,
    init,
    make_x,
    np_params,
    perturb,
    random_variables,
    rms_np,
    silu,
)
from tests.ops.test_ssd import oracle as ssd_oracle

N, G = 8, 2


def mamba2_mixer_np(p, cfg, x):
    dims = mamba2_dims(cfg)
    di, h, hp = dims["di"], dims["heads"], dims["head_dim"]
    zxbcdt = x @ p["in_proj"]["kernel"]
    if cfg.has_canon("B"):
        zxbcdt = zxbcdt + conv_np(zxbcdt, p["canon_b"]["kernel"])
    z, xbc, dt = np.split(zxbcdt, [di, di + dims["conv_dim"]], -1)
    if cfg.has_canon("b"):
        xbc = silu(conv_np(xbc, p["conv1d"]["kernel"], p["conv1d"]["bias"]))
    xs, bm, cm = np.split(xbc, [di, di + G * N], -1)
    dt = np.logaddexp(0.0, dt + p["dt_bias"])
    b, t = x.shape[:2]
    y, _ = ssd_oracle(
        xs.reshape(b, t, h, hp), dt, -np.exp(p["A_log"]), bm.reshape(b, t, G, N), cm.reshape(b, t, G, N), p["D"], None
    )
    y = rms_np(y.reshape(b, t, di) * silu(z), p["norm"], cfg.norm_eps)
    return y @ p["out_proj"]["kernel"]


def config(canon_set):
    return ModelConfig(
        arch="mamba2",
        hidden_size=D,
        num_heads=H,
        canon_set=canon_set,
        ssm_state_size=N,
        ssm_groups=G,
        mamba_chunk_size=8,
    )


@pytest.mark.parametrize("canon_set", ["", "bB"])
def test_matches_numpy(canon_set):
    cfg = config(canon_set)
    mixer = Mamba2Mixer(cfg)
    x = make_x()
    if canon_set:
        variables = init(mixer, x)
        check_mamba2_init(nn.unbox(variables["params"]), cfg)
        variables = perturb(variables, scale=0.1)
    else:
        variables = random_variables(mixer, x, scale=0.1)
    y = jax.jit(mixer.apply)(variables, x)
    chex.assert_shape(y, (B, T, D))
    expected = mamba2_mixer_np(np_params(variables), cfg, np.asarray(x, np.float64))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_noconv1d_is_identity_without_silu():
    """Without "b" there is no conv parameter and xBC reaches the SSD unchanged (no bias, no SiLU): the mixer equals
    the "b" mixer whose conv kernel is [0, 0, 0, 1] with zero bias *and no SiLU* -- checked through the numpy model,
    which applies exactly nothing to xBC when "b" is absent."""
    cfg = config("")
    shape_of = lambda c: nn.unbox(
        jax.eval_shape(lambda: Mamba2Mixer(c).init(jax.random.PRNGKey(0), make_x(t=2)))["params"]
    )
    assert "conv1d" not in shape_of(cfg) and "canon_b" not in shape_of(cfg)
    with_conv = shape_of(config("b"))
    assert with_conv["conv1d"]["kernel"].shape == (4, mamba2_dims(cfg)["conv_dim"])
    assert with_conv["conv1d"]["bias"].shape == (mamba2_dims(cfg)["conv_dim"],)
    # the SiLU really is gone: a negative xBC entry must reach the SSD as is (silu would shrink it)
    x = make_x(3)
    variables = random_variables(Mamba2Mixer(cfg), x, scale=0.1)
    y = jax.jit(Mamba2Mixer(cfg).apply)(variables, x)
    np.testing.assert_allclose(
        y, mamba2_mixer_np(np_params(variables), cfg, np.asarray(x, np.float64)), rtol=1e-4, atol=1e-5
    )


def test_decode_and_token_mask():
    cfg = config("bB")
    mixer = Mamba2Mixer(cfg)
    x = make_x()
    variables = random_variables(mixer, x, scale=0.1)
    check_decode_and_token_mask(mixer, variables, x)


def check_mamba2_init(params, cfg):
    d = cfg.hidden_size
    # PyTorch-default linears: U(+-1/sqrt(fan_in)), std 1/sqrt(3 fan_in)
    assert np.abs(params["in_proj"]["kernel"]).max() <= d**-0.5
    np.testing.assert_allclose(np.std(params["in_proj"]["kernel"]), (3 * d) ** -0.5, rtol=0.1)
    assert np.abs(params["out_proj"]["kernel"]).max() <= (2 * d) ** -0.5
    np.testing.assert_allclose(np.std(params["out_proj"]["kernel"]), (6 * d) ** -0.5, rtol=0.1)
    # conv1d weight and bias U(+-1/sqrt(K)), std 1/sqrt(12) for K = 4
    for name in ("kernel", "bias"):
        assert np.abs(params["conv1d"][name]).max() <= 0.5
        np.testing.assert_allclose(np.std(params["conv1d"][name]), 12**-0.5, rtol=0.15)
    a = np.exp(params["A_log"])
    assert np.all((a >= 1) & (a <= 16)) and np.all(params["D"] == 1) and np.all(params["norm"] == 1)
    dt = np.logaddexp(0.0, np.asarray(params["dt_bias"], np.float64))
    assert np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))


def test_param_shapes():
    d, h, n = 256, 4, 64
    cfg = ModelConfig(arch="mamba2", hidden_size=d, num_heads=h, canon_set="b", ssm_state_size=n)
    params = nn.unbox(jax.eval_shape(Mamba2Mixer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 1, d)))["params"])
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes["in_proj"]["kernel"] == (d, 4 * d + 2 * n + h)
    assert shapes["out_proj"]["kernel"] == (2 * d, d) and shapes["norm"] == (2 * d,)
    assert shapes["conv1d"] == {"kernel": (4, 2 * d + 2 * n), "bias": (2 * d + 2 * n,)}
    assert shapes["A_log"] == shapes["D"] == shapes["dt_bias"] == (h,)
