"""gated_delta_rule: float64 numpy token loop (the oracle) vs the token scan, the UT-chunked form and the step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.ops import gated_delta_rule, gated_delta_rule_step

B, H, DK, DV = 2, 2, 8, 16
CHUNK = 64


def oracle(q, k, v, g, beta, scale, s0, l2):
    """S' = exp(g) S ; u = beta (v - S'^T k) ; S = S' + k u^T ; o = S^T (scale q), float64."""
    q, k, v, g, beta = (np.asarray(a, np.float64) for a in (q, k, v, g, beta))
    if l2:
        q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
        k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    s = np.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3])) if s0 is None else np.asarray(s0, np.float64)
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    for t in range(q.shape[1]):
        s = np.exp(g[:, t])[..., None, None] * s
        u = beta[:, t, :, None] * (v[:, t] - np.einsum("bhde,bhd->bhe", s, k[:, t]))
        s = s + k[:, t, :, :, None] * u[:, :, None, :]
        out[:, t] = np.einsum("bhde,bhd->bhe", s, scale * q[:, t])
    return out, s


def make_inputs(seed, t, with_state, l2=True, gates="mixed"):
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, t, H, DK)).astype(np.float32)
    # without the L2 norm keep |k|^2 beta < 2 so that the delta rule itself is a contraction
    k = (r.normal(size=(B, t, H, DK)) * (1.0 if l2 else 0.3)).astype(np.float32)
    v = r.normal(size=(B, t, H, DV)).astype(np.float32)
    # head 0 strongly decaying, head 1 near-zero log decay (unless all heads are asked to be "weak")
    g = -r.uniform(0.0, 1e-3, size=(B, t, H))
    if gates == "mixed":
        g[:, :, 0] = -r.uniform(0.5, 8.0, size=(B, t))
    beta = r.uniform(0.05, 1.0, size=(B, t, H)).astype(np.float32)
    s0 = r.normal(size=(B, H, DK, DV)).astype(np.float32) if with_state else None
    return q, k, v, g.astype(np.float32), beta, s0


def assert_close(actual, expected, rtol=1e-4):
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


_fwd = jax.jit(gated_delta_rule, static_argnames=("impl", "chunk_size", "use_qk_l2norm"))
_step = jax.jit(gated_delta_rule_step, static_argnames=("use_qk_l2norm",))


@pytest.mark.parametrize("t", [1, 63, 64, 100, 257])
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_matches_oracle(t, with_state):
    seed, l2 = t, True
    q, k, v, g, beta, s0 = make_inputs(seed, t, with_state, l2)
    o_ref, s_ref = oracle(q, k, v, g, beta, DK**-0.5, s0, l2)
    for impl in ("reference", "xla"):
        o, s = _fwd(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=l2, chunk_size=CHUNK, impl=impl)
        chex.assert_shape(o, (B, t, H, DV))
        chex.assert_shape(s, (B, H, DK, DV))
        assert_close(o, o_ref)
        assert_close(s, s_ref)
    state = jnp.zeros((B, H, DK, DV)) if s0 is None else jnp.asarray(s0)
    outs = []
    for i in range(t):
        o_t, state = _step(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], state, use_qk_l2norm=l2)
        chex.assert_shape(o_t, (B, H, DV))
        outs.append(o_t)
    assert_close(jnp.stack(outs, 1), o_ref)
    assert_close(state, s_ref)


def test_forward_without_l2norm():
    """Raw (unnormalised) keys: the UT system is no longer bounded by |k| = 1."""
    q, k, v, g, beta, s0 = make_inputs(11, 100, True, l2=False, gates="weak")
    o_ref, s_ref = oracle(q, k, v, g, beta, DK**-0.5, s0, False)
    for impl in ("reference", "xla"):
        o, s = _fwd(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=False, chunk_size=CHUNK, impl=impl)
        assert_close(o, o_ref)
        assert_close(s, s_ref)


def test_gradients_chunked_match_reference():
    t, l2 = 100, True  # 7 chunks of 16, the last one padded
    q, k, v, g, beta, s0 = make_inputs(7, t, True, l2)
    r = np.random.default_rng(3)
    wo = r.normal(size=(B, t, H, DV)).astype(np.float32)
    ws = r.normal(size=(B, H, DK, DV)).astype(np.float32)

    def loss(impl, *args):
        o, s = gated_delta_rule(*args[:5], initial_state=args[5], use_qk_l2norm=l2, chunk_size=16, impl=impl)
        return jnp.sum(o * wo) + jnp.sum(s * ws)

    grads = {
        impl: jax.jit(jax.grad(lambda *a, impl=impl: loss(impl, *a), argnums=tuple(range(6))))(q, k, v, g, beta, s0)
        for impl in ("reference", "xla")
    }
    for name, a, b in zip("q k v log_decay beta initial_state".split(), grads["xla"], grads["reference"]):
        assert np.all(np.isfinite(a)), name
        assert_close(a, b)


def test_bad_arguments(monkeypatch):
    q, k, v, g, beta, _ = make_inputs(0, 5, False)
    with pytest.raises(ValueError, match="unknown impl"):
        gated_delta_rule(q, k, v, g, beta, impl="triton")
    with pytest.raises(ValueError, match="beta"):
        gated_delta_rule(q, k, v, g, beta[..., None])
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(q, k, v, g, beta, initial_state=jnp.zeros((B, H, DK, DK)))
    from pallas_kernels.linear_scan import api

    assert "gated_delta_rule" not in api.PALLAS_OPS
    with pytest.raises(NotImplementedError, match="Pallas"):
        gated_delta_rule(q, k, v, g, beta, impl="pallas")
