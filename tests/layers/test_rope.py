import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.layers import rope
from canon_jax.layers.rope import apply_rope


def _np_rope(x, pos, rope_dim, theta, version):
    """Per-token, per-pair float64 rotation."""
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
    with pytest.raises(ValueError, match="positions"):
        apply_rope(x, jnp.zeros((3, 2), jnp.int32), rope_dim=8)  # neither batch nor 1
    with pytest.raises(ValueError, match="tables"):
        apply_rope(x, jnp.zeros((1, 2), jnp.int32), rope_dim=8, tables=rope.rope_tables(jnp.zeros((1, 2)), 4))


@pytest.mark.parametrize("version", ["huggingface", "lingua"])
@pytest.mark.parametrize("const", [True, False])  # host-constant tables, or (above the size limit) in the program
def test_default_tables_match_numpy_and_broadcast_over_batch(version, const, monkeypatch):
    """Positions 0..T-1 shared by the batch ([1, T] positions, the default of attention) with the constant tables of
    ``default_rope_tables``: the float64 per-token reference, for a time long enough that angles are large."""
    if not const:
        monkeypatch.setattr(rope, "_CONST_TABLE_LIMIT", 0)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 300, 2, 16)).astype(np.float32)
    pos = np.broadcast_to(np.arange(300, dtype=np.int32), (3, 300))
    tables = jax.jit(lambda: rope.default_rope_tables(300, 12, 500.0))()
    chex.assert_shape(tables, [(1, 300, 6), (1, 300, 6)])
    y = jax.jit(
        lambda x, tb: apply_rope(x, jnp.arange(300)[None], rope_dim=12, theta=500.0, version=version, tables=tb)
    )(jnp.asarray(x), tables)
    chex.assert_shape(y, x.shape)
    # float32 angles: at position p the angle itself carries a rounding error of a few ulp(p) (~p * 2^-23 rad, i.e.
    # 3.6e-5 rad at p = 300), inherent to every float32 implementation; the bound scales with it per element
    pair_norm = np.sqrt(np.sum(x[..., :12] ** 2, axis=-1, keepdims=True))
    tol = 1e-5 + 4 * 2.0**-23 * pos[:, :, None, None] * pair_norm
    err = np.abs(np.asarray(y) - _np_rope(x, pos, 12, 500.0, version))
    assert np.all(err <= tol), float(np.max(err - tol))
    # per-sequence [B, T] positions with in-program tables meet the same bound
    y_b = apply_rope(jnp.asarray(x), jnp.asarray(pos), rope_dim=12, theta=500.0, version=version)
    err_b = np.abs(np.asarray(y_b) - _np_rope(x, pos, 12, 500.0, version))
    assert np.all(err_b <= tol), float(np.max(err_b - tol))


def _eqn_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqn_shapes(sub)
        yield from ((eqn.primitive.name, v.aval.shape) for v in eqn.outvars)


@pytest.mark.parametrize("version", ["huggingface", "lingua"])
def test_rotation_and_its_gradient_form_only_whole_heads(version):
    """TPU pads every minor dimension to 128 lanes: a partial RoPE (16 of 64 channels) must not slice the heads."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 3, 64)), jnp.float32)
    cos, sin = rope.rope_tables(jnp.arange(8)[None] + 5, 16)
    fn = lambda x: jnp.sum(rope.rotate(x, cos, sin, version=version) ** 2)
    shapes = list(_eqn_shapes(jax.make_jaxpr(jax.value_and_grad(fn))(x).jaxpr))
    narrow = [(p, s) for p, s in shapes if len(s) == 4 and s[-1] != 64]
    assert not narrow, narrow
    # the gradient is the float64 rotation's transpose: d/dx sum(R x)^2 = 2 R^T R x = 2 x (R is orthogonal)
    g = jax.grad(fn)(x)
    chex.assert_shape(g, x.shape)
    np.testing.assert_allclose(np.asarray(g), 2 * np.asarray(x), rtol=1e-5, atol=1e-6)
