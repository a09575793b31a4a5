"""GLA5 mixer: float64 numpy re-implementation from the parameters, decoding, token masks, inits, bad input."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.config import ModelConfig
from canon_jax.layers.gla import GLAMixer
from tests.ops.test_gla import oracle as gla_oracle

D, H, B, T = 32, 2, 2, 20


# ---- float64 numpy pieces, shared with the GDN2 / Mamba2 tests ---------------------------------------------------
def silu(x):
    return x / (1.0 + np.exp(-x))


def conv_np(x, w, b=None):
    """Depthwise causal conv, x [B, T, C], w [K, C] (last tap = current token), zero history."""
    k, t = w.shape[0], x.shape[1]
    xp = np.concatenate([np.zeros((x.shape[0], k - 1, x.shape[2])), x], axis=1)
    y = sum(w[j] * xp[:, j : j + t] for j in range(k))
    return y if b is None else y + b


def rms_np(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_params(variables):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables["params"]))


def qkv_np(p, cfg, x):
    q, k, v = (x @ p[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj"))
    if cfg.has_canon("b"):
        q, k, v = (silu(conv_np(a, p[n]["kernel"])) for a, n in ((q, "q_conv1d"), (k, "k_conv1d"), (v, "v_conv1d")))
    else:
        q, k, v = silu(q), silu(k), silu(v)
    if cfg.has_canon("B"):
        qkv = np.concatenate([q, k, v], -1)
        qkv = qkv + conv_np(qkv, p["canon_b"]["kernel"])
        q, k, v = np.split(qkv, [cfg.key_dim, 2 * cfg.key_dim], -1)
    return q, k, v


def low_rank_np(p, x):
    return x @ p["down"] @ p["up"] + p["bias"]


def output_np(p, cfg, x, o):
    b, t, h, dv = o.shape
    g = low_rank_np(p["g_proj"], x).reshape(b, t, h, dv)
    y = (rms_np(o, p["o_norm"], cfg.norm_eps) * silu(g)).reshape(b, t, h * dv)
    return y @ p["o_proj"]["kernel"]


def gla_mixer_np(p, cfg, x):
    h = cfg.num_heads
    q, k, v = qkv_np(p, cfg, x)
    gk = low_rank_np(p["gk_proj"], x)
    log_gate = -np.logaddexp(0.0, -gk) / cfg.gate_logit_normalizer
    r = lambda a: a.reshape(a.shape[0], a.shape[1], h, -1)
    o, _ = gla_oracle(r(q), r(k), r(v), r(log_gate), (cfg.key_dim // h) ** -0.5, None)
    return output_np(p, cfg, x, o)


def make_x(seed=0, t=T, b=B):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, D)), jnp.float32)


def perturb(variables, seed=1, scale=0.3):
    """Larger random parameters than the init so that every path (gates, convs) matters in the comparison."""
    r = np.random.default_rng(seed)
    return {
        "params": jax.tree.map(
            lambda a: np.asarray(a) + scale * r.normal(size=a.shape).astype(np.float32), nn.unbox(variables["params"])
        )
    }


def random_variables(mixer, x, seed=1, scale=0.3):
    """Random parameters (norm weights and D around 1) from the init's shapes: no compilation needed."""
    shapes = nn.unbox(jax.eval_shape(lambda: mixer.init(jax.random.PRNGKey(0), x[:, :1]))["params"])
    r = np.random.default_rng(seed)

    def leaf(path, a):
        base = 1.0 if path[-1].key in ("o_norm", "norm", "D") else 0.0
        return (base + scale * r.normal(size=a.shape)).astype(np.float32)

    return {"params": jax.tree_util.tree_map_with_path(leaf, shapes)}


def init(mixer, x, **kw):
    return jax.jit(lambda x: mixer.init(jax.random.PRNGKey(0), x, **kw))(x)


def jit_apply(mixer):
    """``mixer.apply`` compiled once per (shape, decode): eager Flax + scans would dominate the test time."""
    return jax.jit(mixer.apply, static_argnames=("decode", "mutable"))


def check_decode_and_token_mask(mixer, variables, x, n_pad=3, prefill=10, tol=1e-4):
    """(1) Prefill ``prefill`` tokens, then single steps == the full forward.
    (2) Left padding (masked garbage tokens) does not change the valid tokens' outputs, in the full forward and
    through the decode path (prefill with the padded prompt, then one step).
    Shapes are shared between the cases (an all-True mask where none is needed; outputs are causal, so a prefix of
    the full forward is the forward of the prefix) to keep the number of compilations at four."""
    apply = jit_apply(mixer)
    b, t = x.shape[:2]
    ones = jnp.ones((b, t), bool)
    cache0 = jax.tree.map(
        lambda a: jnp.zeros(a.shape, a.dtype),
        jax.eval_shape(lambda: mixer.init(jax.random.PRNGKey(0), x[:, :1], decode=True))["cache"],
    )
    full = apply(variables, x, token_mask=ones)
    y, mut = apply(
        {**variables, "cache": cache0}, x[:, :prefill], token_mask=ones[:, :prefill], decode=True, mutable=("cache",)
    )
    outs = [y]
    for i in range(prefill, t):
        y, mut = apply({**variables, "cache": mut["cache"]}, x[:, i : i + 1], decode=True, mutable=("cache",))
        outs.append(y)
    chex.assert_trees_all_close(jnp.concatenate(outs, 1), full, rtol=tol, atol=tol)

    xp = jnp.concatenate([5.0 * make_x(9, n_pad, b), x[:, : t - n_pad]], 1)  # garbage, then the first valid tokens
    mask = jnp.concatenate([jnp.zeros((b, n_pad), bool), jnp.ones((b, t - n_pad), bool)], 1)
    out = apply(variables, xp, token_mask=mask)
    chex.assert_shape(out, xp.shape)
    chex.assert_trees_all_close(out[:, n_pad:], full[:, : t - n_pad], rtol=tol, atol=tol)
    y, mut = apply(
        {**variables, "cache": cache0}, xp[:, :prefill], token_mask=mask[:, :prefill], decode=True, mutable=("cache",)
    )
    y2, _ = apply({**variables, "cache": mut["cache"]}, xp[:, prefill : prefill + 1], decode=True, mutable=("cache",))
    chex.assert_trees_all_close(
        jnp.concatenate([y[:, n_pad:], y2], 1), full[:, : prefill + 1 - n_pad], rtol=tol, atol=tol
    )


# ---- tests ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("canon_set", ["", "bB"])
def test_matches_numpy(canon_set):
    cfg = ModelConfig(arch="gla", hidden_size=D, num_heads=H, canon_set=canon_set, linear_chunk_size=16)
    mixer = GLAMixer(cfg)
    x = make_x()
    if canon_set:
        variables = init(mixer, x)
        check_init_stats(nn.unbox(variables["params"]))
        np.testing.assert_allclose(np.std(nn.unbox(variables["params"])["gk_proj"]["up"]), 0.02**0.5 / 2, rtol=0.1)
        variables = perturb(variables)
    else:
        variables = random_variables(mixer, x)
    y = jax.jit(mixer.apply)(variables, x)
    chex.assert_shape(y, (B, T, D))
    expected = gla_mixer_np(np_params(variables), cfg, np.asarray(x, np.float64))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_decode_and_token_mask():
    cfg = ModelConfig(arch="gla", hidden_size=D, num_heads=H, canon_set="bB", linear_chunk_size=16)
    mixer = GLAMixer(cfg)
    x = make_x()
    variables = random_variables(mixer, x)
    check_decode_and_token_mask(mixer, variables, x)


def test_param_shapes():
    d, h = 256, 4
    cfg = ModelConfig(arch="gla", hidden_size=d, num_heads=h, canon_set="bB")
    params = nn.unbox(jax.eval_shape(GLAMixer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 1, d)))["params"])
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes["q_proj"]["kernel"] == (d, d) and shapes["v_proj"]["kernel"] == (d, 2 * d)
    assert shapes["o_proj"]["kernel"] == (2 * d, d)
    assert shapes["gk_proj"] == {"down": (d, 16), "up": (16, d), "bias": (d,)}
    assert shapes["g_proj"] == {"down": (d, 16), "up": (16, 2 * d), "bias": (2 * d,)}
    assert shapes["v_conv1d"]["kernel"] == (4, 2 * d) and shapes["canon_b"]["kernel"] == (4, 4 * d)
    assert shapes["o_norm"] == (2 * d // h,)


def check_init_stats(real):
    """Init statistics at D = 32 (>= 1024 entries per matrix: the sample std is within ~2.2% per sigma)."""
    np.testing.assert_allclose(np.std(real["q_proj"]["kernel"]), 0.02, rtol=0.1)
    np.testing.assert_allclose(np.std(real["v_proj"]["kernel"]), 0.02, rtol=0.1)
    np.testing.assert_allclose(np.std(real["v_conv1d"]["kernel"]), 0.02, rtol=0.1)
    np.testing.assert_allclose(np.std(real["g_proj"]["up"]), 0.02**0.5 / 2, rtol=0.1)  # zeyuan_split_init
    np.testing.assert_allclose(np.std(real["g_proj"]["down"]), 0.02**0.5 / 2, rtol=0.15)  # 512 entries
    assert np.all(real["o_norm"] == 1) and np.all(real["g_proj"]["bias"] == 0)
    assert np.abs(real["canon_b"]["kernel"]).max() <= 0.5  # Kaiming-uniform U(-1/2, 1/2) for K = 4
    assert np.std(real["canon_b"]["kernel"]) > 0.2  # ... and not N(0, 0.02)


def test_bad_input():
    cfg = ModelConfig(arch="gla", hidden_size=D, num_heads=H, canon_set="b", segment_aware=True)
    x = make_x(t=4)
    with pytest.raises(ValueError, match="hidden_size"):
        GLAMixer(cfg).init(jax.random.PRNGKey(0), x[..., :8])
    with pytest.raises(NotImplementedError, match="segment_aware"):
        GLAMixer(cfg).init(jax.random.PRNGKey(0), x, segment_ids=jnp.ones((B, 4), jnp.int32))
