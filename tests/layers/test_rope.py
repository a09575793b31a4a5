import chex
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.layers.rope import apply_rope


def _np_rope(x, pos, rope_dim, theta, version):
    """Per-token, per-pair float64 rotation (SPEC A.2)."""
    y = np.array(x, np.float64)
    half = rope_dim // 2
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(half):
                ang = pos[b, t] * theta ** (-2.0 * i / rope_dim)
                ia, ib = (i, i + half) if version == "huggingface" else (2 * i, 2 * i + 1)
                a, c = x[b, t, :, ia].astype(np.float64), x[b, t, :, ib].astype(np.float64)
                y[b, t, :, ia] = a * np.cos(ang) - c * np.sin(ang)
                y[b, t, :, ib] = c * np.cos(ang) + a * np.sin(ang)
    return y


@pytest.mark.parametrize("version", ["huggingface", "lingua"])
@pytest.mark.parametrize("rope_dim", [0, 4, 12])
def test_matches_numpy(version, rope_dim):
    rng = np.random.default_rng(rope_dim)
    x = rng.normal(size=(2, 9, 3, 12)).astype(np.float32)
    pos = rng.integers(0, 300, size=(2, 9)).astype(np.int32)
    y = apply_rope(jnp.asarray(x), jnp.asarray(pos), rope_dim=rope_dim, theta=500.0, version=version)
    chex.assert_shape(y, x.shape)
    np.testing.assert_allclose(np.asarray(y), _np_rope(x, pos, rope_dim, 500.0, version), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(y)[..., rope_dim:], x[..., rope_dim:])  # pass-through channels


@pytest.mark.parametrize("version", ["huggingface", "lingua"])
def test_scores_depend_only_on_relative_position(version):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

    def score(pq, pk):
        rq = apply_rope(q, jnp.array([[pq]]), rope_dim=8, version=version)
        rk = apply_rope(k, jnp.array([[pk]]), rope_dim=8, version=version)
        return float(jnp.sum(rq * rk))

    np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)


def test_errors():
    x = jnp.zeros((1, 2, 1, 8))
    with pytest.raises(ValueError, match="rope_dim"):
        apply_rope(x, jnp.zeros((1, 2), jnp.int32), rope_dim=10)
    with pytest.raises(ValueError, match="version"):
        apply_rope(x, jnp.zeros((1, 2), jnp.int32), rope_dim=8, version="neox")
    with pytest.raises(ValueError, match="positions"):
        apply_rope(x, jnp.zeros((2,), jnp.int32), rope_dim=8)
