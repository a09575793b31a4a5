"""gla: float64 numpy token loop (the oracle) vs the token scan, the chunked form and the decode step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.ops import gla, gla_step

B, H, DK, DV = 2, 2, 8, 16
CHUNK = 64


def oracle(q, k, v, g, scale, s0):
    """S_t = diag(exp g_t) S_{t-1} + k_t v_t^T ; o_t = (scale q_t)^T S_t, float64."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    s = np.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3])) if s0 is None else np.asarray(s0, np.float64)
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    for t in range(q.shape[1]):
        s = np.exp(g[:, t])[..., None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = np.einsum("bhd,bhde->bhe", scale * q[:, t], s)
    return out, s


def make_inputs(seed, t, with_state):
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, t, H, DK)).astype(np.float32)
    k = r.normal(size=(B, t, H, DK)).astype(np.float32)
    v = r.normal(size=(B, t, H, DV)).astype(np.float32)
    # head 0: strong gates, forget almost everything within a few tokens (exp(log_gate) in [e^-8, e^-0.5]);
    # head 1: near-zero log gates, almost no forgetting, the state grows over the whole sequence
    g = np.stack([-r.uniform(0.5, 8.0, size=(B, t, DK)), -r.uniform(0.0, 1e-3, size=(B, t, DK))], axis=2)
    s0 = r.normal(size=(B, H, DK, DV)).astype(np.float32) if with_state else None
    return q, k, v, g.astype(np.float32), s0


def assert_close(actual, expected, rtol=1e-4):
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


_fwd = jax.jit(gla, static_argnames=("impl", "chunk_size"))
_step = jax.jit(gla_step)


@pytest.mark.parametrize("t", [1, 63, 64, 100, 257])
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_matches_oracle(t, with_state):
    seed = t
    q, k, v, g, s0 = make_inputs(seed, t, with_state)
    o_ref, s_ref = oracle(q, k, v, g, DK**-0.5, s0)
    for impl in ("reference", "xla"):
        o, s = _fwd(q, k, v, g, initial_state=s0, chunk_size=CHUNK, impl=impl)
        chex.assert_shape(o, (B, t, H, DV))
        chex.assert_shape(s, (B, H, DK, DV))
        assert o.dtype == jnp.float32
        assert_close(o, o_ref)
        assert_close(s, s_ref)
    # decode: one token at a time from the same initial state
    state = jnp.zeros((B, H, DK, DV)) if s0 is None else jnp.asarray(s0)
    outs = []
    for i in range(t):
        o_t, state = _step(q[:, i], k[:, i], v[:, i], g[:, i], state)
        chex.assert_shape(o_t, (B, H, DV))
        outs.append(o_t)
    assert_close(jnp.stack(outs, 1), o_ref)
    assert_close(state, s_ref)


def test_gradients_chunked_match_reference():
    t = 100  # 7 chunks of 16, the last one padded
    q, k, v, g, s0 = make_inputs(7, t, True)
    r = np.random.default_rng(3)
    wo = r.normal(size=(B, t, H, DV)).astype(np.float32)
    ws = r.normal(size=(B, H, DK, DV)).astype(np.float32)

    def loss(impl, *args):
        o, s = gla(*args[:4], initial_state=args[4], chunk_size=16, impl=impl)
        return jnp.sum(o * wo) + jnp.sum(s * ws)

    grads = {
        impl: jax.jit(jax.grad(lambda *a, impl=impl: loss(impl, *a), argnums=tuple(range(5))))(q, k, v, g, s0)
        for impl in ("reference", "xla")
    }
    for name, a, b in zip("q k v log_gate initial_state".split(), grads["xla"], grads["reference"]):
        assert np.all(np.isfinite(a)), name
        assert_close(a, b)


def test_custom_scale_odd_chunk_and_bfloat16_output_dtype():
    q, k, v, g, _ = make_inputs(5, 50, False)
    # chunk 24: sub-chunks of 12 (the largest divisor <= 16), 3 chunks with a padded last one
    o, _ = jax.jit(lambda *a: gla(*a, scale=0.3, chunk_size=24))(q, k, v, g)
    assert_close(o, oracle(q, k, v, g, 0.3, None)[0])
    ob, sb = _fwd(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v, g)))
    assert ob.dtype == jnp.bfloat16 and sb.dtype == jnp.float32


def test_bad_arguments(monkeypatch):
    q, k, v, g, _ = make_inputs(0, 5, False)
    with pytest.raises(ValueError, match="unknown impl"):
        gla(q, k, v, g, impl="cuda")
    with pytest.raises(ValueError, match="log_gate"):
        gla(q, k, v, g[..., :3])
    with pytest.raises(ValueError, match="initial_state"):
        gla(q, k, v, g, initial_state=jnp.zeros((B, H, DV, DK)))
    with pytest.raises(ValueError, match="chunk_size"):
        gla(q, k, v, g, chunk_size=0)
    from pallas_kernels.linear_scan import api

    monkeypatch.setattr(api, "PALLAS_OPS", api.PALLAS_OPS - {"gla"})  # an op without a Pallas kernel
    with pytest.raises(NotImplementedError, match="Pallas"):
        gla(q, k, v, g, impl="pallas_interpret")
