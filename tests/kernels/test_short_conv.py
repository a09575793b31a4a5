"""Short-conv Pallas kernels (TPU and GPU families) in interpret mode: values vs a float64 loop, gradients vs
``jax.vjp`` of the independent XLA implementation in ``canon_jax.ops.conv``."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.ops.conv import causal_conv1d
from pallas_kernels.common import BlockSizes
from pallas_kernels.short_conv import reference as conv_ref
from pallas_kernels.short_conv import short_conv, short_conv_reference, supports

SMALL = BlockSizes(block_t=16, block_d=16)  # several time and channel tiles at CI sizes
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _inputs(seed, b, t, d, k, dtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    w = (rng.standard_normal((k, d)) * 0.5).astype(np.float32)
    bias = rng.standard_normal(d).astype(np.float32)
    state = rng.standard_normal((b, d, k)).astype(np.float32)
    seg = np.sort(rng.integers(1, 4, (b, t)), axis=1).astype(np.int32)
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # the reference sees the rounded inputs
    state = np.asarray(jnp.asarray(state, dtype).astype(jnp.float32))
    return x, w, bias, state, seg


# (backend, B, T, D, K, activation, residual, bias, state, segments, dtype)
VALUE_CASES = [
    ("tpu", 2, 3, 16, 4, None, True, False, True, False, jnp.float32),  # T < K, state
    ("tpu", 1, 37, 32, 3, "silu", False, True, False, True, jnp.float32),  # T % block != 0, channel tiles, segments
    ("tpu", 2, 40, 16, 5, "silu", True, True, True, True, jnp.float32),  # everything on, K = 5
    ("tpu", 1, 21, 16, 1, None, True, False, True, False, jnp.float32),  # K = 1
    ("tpu", 1, 19, 40, 4, "silu", True, True, True, True, jnp.float32),  # D = 40: channels zero-padded to 48
    ("tpu", 2, 35, 16, 4, "silu", True, True, True, True, jnp.bfloat16),
    ("gpu", 2, 3, 16, 4, None, True, False, True, False, jnp.float32),
    ("gpu", 1, 37, 32, 5, "silu", True, True, True, False, jnp.float32),
    ("gpu", 2, 35, 16, 3, "silu", False, True, True, False, jnp.bfloat16),
    ("gpu", 1, 37, 32, 3, "silu", False, True, False, True, jnp.float32),  # segments, T % tile != 0, channel tiles
    ("gpu", 2, 40, 16, 4, None, True, True, True, True, jnp.float32),  # segments + state
    ("gpu", 1, 19, 40, 4, "silu", True, True, True, True, jnp.float32),  # segments, channels padded to 48
    ("gpu", 1, 21, 16, 1, None, True, False, True, True, jnp.float32),  # K = 1: segments change nothing
    ("gpu", 2, 35, 16, 4, "silu", True, True, True, True, jnp.bfloat16),
]


@pytest.mark.parametrize("case", VALUE_CASES, ids=lambda c: "-".join(map(str, c[:5])) + f"-{jnp.dtype(c[-1]).name}")
def test_forward_matches_float64_loop(case):
    backend, b, t, d, k, act, res, use_bias, use_state, use_seg, dtype = case
    x, w, bias, state, seg = _inputs(0, b, t, d, k, dtype)
    kw = dict(
        bias=bias if use_bias else None,
        activation=act,
        residual=res,
        segment_ids=seg if use_seg else None,
        initial_state=state if use_state else None,
    )
    kw_dev = {
        k_: (None if v is None else (jnp.asarray(v, dtype) if k_ == "initial_state" else jnp.asarray(v)))
        for k_, v in kw.items()
        if k_ not in ("activation", "residual")
    }
    fn = jax.jit(
        lambda x, w, kw_dev: short_conv(
            x, w, interpret=True, backend=backend, block_sizes=SMALL, activation=act, residual=res, **kw_dev
        )
    )
    y = fn(jnp.asarray(x, dtype), jnp.asarray(w), kw_dev)
    chex.assert_shape(y, (b, t, d))
    assert y.dtype == dtype
    ref = short_conv_reference(x, w, **kw)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=TOL[dtype], rtol=TOL[dtype])


GRAD_CASES = [
    ("tpu", 2, 19, 32, 4, "silu", True, True, True, True, jnp.float32),
    ("tpu", 1, 3, 16, 5, None, True, False, True, False, jnp.float32),  # T < K: state gradient hits every row
    ("tpu", 1, 12, 24, 4, None, True, True, True, False, jnp.float32),  # padded channels
    ("tpu", 2, 21, 16, 3, "silu", False, True, True, True, jnp.bfloat16),
    ("gpu", 2, 19, 32, 4, "silu", True, True, True, False, jnp.float32),
    ("gpu", 2, 19, 32, 4, "silu", True, True, True, True, jnp.float32),
    ("gpu", 1, 37, 24, 3, None, False, True, True, True, jnp.float32),  # T % tile != 0, padded channels
    ("gpu", 1, 13, 16, 1, None, True, True, True, True, jnp.float32),  # K = 1
    ("gpu", 2, 21, 16, 3, "silu", False, True, True, True, jnp.bfloat16),
    ("gpu", 1, 35, 16, 4, "silu", True, True, True, True, jnp.bfloat16),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "-".join(map(str, c[:5])) + f"-{jnp.dtype(c[-1]).name}")
def test_gradients_match_xla(case):
    backend, b, t, d, k, act, res, use_bias, use_state, use_seg, dtype = case
    x, w, bias, state, seg = _inputs(1, b, t, d, k, dtype)
    seg = jnp.asarray(seg) if use_seg else None
    x, state = jnp.asarray(x, dtype), jnp.asarray(state, dtype)
    w, bias = jnp.asarray(w), jnp.asarray(bias)
    dy = jnp.asarray(np.random.default_rng(2).standard_normal((b, t, d)), dtype)

    def loss(fn, x, w, bias, state):
        y = fn(
            x,
            w,
            bias=bias if use_bias else None,
            activation=act,
            residual=res,
            segment_ids=seg,
            initial_state=state if use_state else None,
        )
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

    kern = lambda *a, **kw: short_conv(*a, interpret=True, backend=backend, block_sizes=SMALL, **kw)
    xla = lambda *a, **kw: causal_conv1d(*a, impl="xla", **kw)
    g_k = jax.jit(jax.grad(functools.partial(loss, kern), argnums=(0, 1, 2, 3)))(x, w, bias, state)
    g_x = jax.jit(jax.grad(functools.partial(loss, xla), argnums=(0, 1, 2, 3)))(x, w, bias, state)
    for name, a, r in zip(("dx", "dw", "dbias", "dstate"), g_k, g_x):
        chex.assert_shape(a, r.shape)
        scale = max(1.0, float(jnp.max(jnp.abs(r.astype(jnp.float32)))))
        tol = TOL[dtype] * (4 if dtype == jnp.bfloat16 else 1)
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(r, np.float32), atol=tol * scale, rtol=tol, err_msg=name
        )


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_segment_boundaries_at_tile_edges(backend):
    """Boundaries exactly at, one before and one after a 16-row tile edge (the halo rows belong to another
    segment), non-monotone ids and a padding (id 0) tail: values vs the float64 loop, gradients vs XLA autodiff."""
    b, t, d, k = 2, 45, 16, 4
    x, w, bias, state, _ = _inputs(6, b, t, d, k, jnp.float32)
    seg = np.ones((b, t), np.int32)
    seg[0, 16:] = 2
    seg[0, 33:] = 1  # non-monotone ids (taps compare ids for equality, as in the XLA op)
    seg[0, 40:] = 0
    seg[1, 15:] = 3
    seg[1, 17:] = 4
    seg[1, 32:] = 5
    kw = dict(bias=bias, activation="silu", residual=True, segment_ids=seg, initial_state=state)
    kern = lambda x, w, bias, state: short_conv(
        x,
        w,
        bias=bias,
        activation="silu",
        residual=True,
        segment_ids=jnp.asarray(seg),
        initial_state=state,
        interpret=True,
        backend=backend,
        block_sizes=SMALL,
    )
    xla = lambda x, w, bias, state: causal_conv1d(
        x, w, bias=bias, activation="silu", residual=True, segment_ids=jnp.asarray(seg), initial_state=state, impl="xla"
    )
    args = tuple(jnp.asarray(a) for a in (x, w, bias, state))
    y = jax.jit(kern)(*args)
    chex.assert_shape(y, (b, t, d))
    np.testing.assert_allclose(np.asarray(y, np.float64), short_conv_reference(x, w, **kw), atol=2e-5, rtol=2e-5)
    dy = jnp.asarray(np.random.default_rng(7).standard_normal((b, t, d)), jnp.float32)
    loss = lambda fn, *a: jnp.sum(fn(*a) * dy)
    g_k = jax.jit(jax.grad(functools.partial(loss, kern), argnums=(0, 1, 2, 3)))(*args)
    g_x = jax.jit(jax.grad(functools.partial(loss, xla), argnums=(0, 1, 2, 3)))(*args)
    for name, a, r in zip(("dx", "dw", "dbias", "dstate"), g_k, g_x):
        chex.assert_shape(a, r.shape)
        scale = max(1.0, float(jnp.max(jnp.abs(r))))
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5 * scale, rtol=2e-5, err_msg=name)


def test_both_kernel_families_support_segment_ids():
    seg = jnp.ones((1, 8), jnp.int32)
    assert supports(backend="gpu", segment_ids=seg) and supports(backend="tpu", segment_ids=seg)


def test_bad_arguments_raise():
    x = jnp.zeros((1, 8, 16))
    with pytest.raises(ValueError, match="weight"):
        short_conv(x, jnp.zeros((4, 8)), interpret=True)
    with pytest.raises(ValueError, match="non-empty"):
        short_conv(jnp.zeros((1, 0, 16)), jnp.zeros((4, 16)), interpret=True)
    with pytest.raises(ValueError, match="activation"):
        short_conv(x, jnp.zeros((4, 16)), activation="gelu", interpret=True)
    with pytest.raises(ValueError, match="backend"):
        short_conv(x, jnp.zeros((4, 16)), interpret=True, backend="cpu")
    with pytest.raises(NotImplementedError, match="interpret=True"):
        short_conv(x, jnp.zeros((4, 16)))  # compiled kernel on a CPU-only machine


def test_reference_backward_pieces_match_autodiff():
    """The XLA backward pieces (dx, dw, d initial-state) equal jax.vjp of the XLA pre-activation."""
    x, w, _, state, seg = _inputs(4, 2, 9, 8, 4, jnp.float32)
    x, w, state, seg = jnp.asarray(x), jnp.asarray(w), jnp.asarray(state), jnp.asarray(seg)
    g = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)
    _, vjp = jax.vjp(lambda x, w, s: conv_ref.conv_pre_xla(x, w, None, seg, s), x, w, state)
    dx, dw, ds = vjp(g)
    np.testing.assert_allclose(conv_ref.dx_xla(g, w, seg), dx, atol=1e-5)
    np.testing.assert_allclose(conv_ref.dweight_xla(g, x, 4, seg, state), dw, atol=1e-5)
    np.testing.assert_allclose(conv_ref.dhistory_xla(g, w, seg), jnp.swapaxes(ds, 1, 2)[:, 1:], atol=1e-5)
    np.testing.assert_allclose(ds[:, :, 0], 0.0)  # slot 0 of the state is never read
