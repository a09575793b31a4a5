"""``canon_jax.ops.linear``: the projections' matmul with a hand-written VJP equals ``jnp.dot`` and its autodiff."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.ops import linear


@pytest.mark.parametrize("lead", [(5,), (2, 7), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("d,f", [(6, 9), (9, 6)])  # both orders of the weight-gradient contraction
def test_matmul_values_and_gradients_equal_jnp_dot(lead, dtype, d, f):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(lead + (d,)), dtype)
    w = jnp.asarray(rng.standard_normal((d, f)), dtype)
    ct = jnp.asarray(rng.standard_normal(lead + (f,)), dtype)
    y = linear.matmul(x, w)
    chex.assert_shape(y, lead + (f,))
    assert y.dtype == jnp.dot(x, w).dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(jnp.dot(x, w), np.float32))
    got = jax.vjp(linear.matmul, x, w)[1](ct)
    want = jax.vjp(jnp.dot, x, w)[1](ct)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    for g, r in zip(got, want):
        chex.assert_shape(g, r.shape)
        assert g.dtype == r.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol)
    # float64 reference of the weight gradient: sum over every leading axis
    x64, ct64 = np.asarray(x, np.float64).reshape(-1, d), np.asarray(ct, np.float64).reshape(-1, f)
    np.testing.assert_allclose(np.asarray(got[1], np.float64), x64.T @ ct64, rtol=tol, atol=tol * 10)


def test_dense_dot_general_hook_matches_flax_default_and_passes_other_contractions_through():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 4)), jnp.float32)
    fast, plain = nn.Dense(5, dot_general=linear.dot_general), nn.Dense(5)
    params = plain.init(jax.random.key(0), x)
    np.testing.assert_allclose(fast.apply(params, x), plain.apply(params, x), rtol=1e-6)
    g1 = jax.grad(lambda p: jnp.sum(fast.apply(p, x) ** 2))(params)
    g2 = jax.grad(lambda p: jnp.sum(plain.apply(p, x) ** 2))(params)
    chex.assert_trees_all_close(g1, g2, rtol=1e-5, atol=1e-6)
    # a batched contraction is not the projection pattern: it goes to lax.dot_general unchanged
    a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    dn = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(linear.dot_general(a, b, dn), jax.lax.dot_general(a, b, dn))
