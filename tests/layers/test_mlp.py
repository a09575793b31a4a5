import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.config import ModelConfig
from canon_jax.layers.mlp import MLP


@pytest.mark.parametrize("canon", ["", "D"])
def test_fused_and_separate_projections_compute_the_same(canon):
    cfg = ModelConfig(hidden_size=16, num_heads=2, intermediate_size=24, canon_set=canon)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 16)), jnp.float32)
    sep = nn.unbox(MLP(cfg).init(jax.random.key(0), x)["params"])
    y = MLP(cfg).apply({"params": sep}, x)
    chex.assert_shape(y, (2, 6, 16))
    fused = {k: v for k, v in sep.items() if k not in ("gate_proj", "up_proj")}
    fused["both_proj"] = {"kernel": jnp.concatenate([sep["gate_proj"]["kernel"], sep["up_proj"]["kernel"]], 1)}
    np.testing.assert_allclose(np.asarray(MLP(cfg, fused=True).apply({"params": fused}, x)), np.asarray(y), atol=1e-6)
    # float64 reference: W2(SiLU(g) * u), with Canon-D on concat(g, u)
    xs = np.asarray(x, np.float64)
    g = xs @ np.asarray(sep["gate_proj"]["kernel"], np.float64)
    u = xs @ np.asarray(sep["up_proj"]["kernel"], np.float64)
    if canon:
        w = np.asarray(sep["canon_d"]["kernel"], np.float64)  # [K, 48]
        gu = np.concatenate([g, u], -1)
        conv = sum(w[j] * np.pad(gu, ((0, 0), (3 - j, 0), (0, 0)))[:, :6] for j in range(4))
        gu = gu + conv
        g, u = gu[..., :24], gu[..., 24:]
    ref = (g / (1 + np.exp(-g)) * u) @ np.asarray(sep["down_proj"]["kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)


@pytest.mark.parametrize("activation,bias", [(None, False), ("silu", True)])
def test_split_canon_equals_canon_on_concat(activation, bias):
    """Canon on a list of parts (used for Canon-B/D) == Canon on the concatenated tensor: values, params and decode
    states."""
    from canon_jax.layers import Canon

    rng = np.random.default_rng(0)
    parts = [jnp.asarray(rng.normal(size=(2, 6, c)), jnp.float32) for c in (5, 3, 4)]
    cat = jnp.concatenate(parts, -1)
    kw = dict(kernel_size=3, activation=activation, use_bias=bias)
    params = nn.unbox(Canon(**kw).init(jax.random.key(0), cat)["params"])
    params = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(size=a.shape), jnp.float32) * 0.3, params)
    ref = Canon(**kw).apply({"params": params}, cat)
    got = Canon(**kw).apply({"params": params}, parts)
    chex.assert_shape(got, [(2, 6, 5), (2, 6, 3), (2, 6, 4)])
    np.testing.assert_allclose(np.asarray(jnp.concatenate(got, -1)), np.asarray(ref), atol=1e-6)
    # decode: prefill 4 tokens then one step, states identical
    cache = {"state": jnp.zeros((2, 12, 3))}
    outs = []
    for layer, inputs in (
        (Canon(**kw), lambda sl: jnp.concatenate([p[:, sl] for p in parts], -1)),
        (Canon(**kw), lambda sl: [p[:, sl] for p in parts]),
    ):
        c = dict(cache)
        y1, v = layer.apply({"params": params, "cache": c}, inputs(slice(0, 4)), decode=True, mutable=["cache"])
        y2, v = layer.apply(
            {"params": params, "cache": v["cache"]}, inputs(slice(4, 5)), decode=True, mutable=["cache"]
        )
        if isinstance(y1, list):
            y1, y2 = jnp.concatenate(y1, -1), jnp.concatenate(y2, -1)
        outs.append((y1, y2, v["cache"]["state"]))
    for a, b in zip(*outs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
