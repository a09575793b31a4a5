"""The TPU kernel family under Pallas' TPU interpreter with its checks on: scratch buffers start as NaN (a read of
an unwritten halo row would poison the output), out-of-bounds reads raise, races are detected."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from canon_jax.ops.conv import causal_conv1d
from pallas_kernels.common import BlockSizes
from pallas_kernels.linear_scan import gla, gla_reference
from pallas_kernels.short_conv import short_conv

STRICT = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise")


def test_short_conv_forward_and_backward_strict():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 21, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    state = jnp.asarray(rng.standard_normal((1, 16, 4)), jnp.float32)
    seg = jnp.asarray(np.repeat([[1, 2]], [9, 12], axis=1), jnp.int32)

    def loss(fn, x, w, state):
        y = fn(x, w, activation="silu", residual=True, segment_ids=seg, initial_state=state)
        return jnp.sum(jnp.sin(y)), y

    kern = functools.partial(short_conv, interpret=STRICT, block_sizes=BlockSizes(block_t=8, block_d=16))
    (_, y), g = jax.value_and_grad(functools.partial(loss, kern), argnums=(0, 1, 2), has_aux=True)(x, w, state)
    (_, y_ref), g_ref = jax.value_and_grad(
        functools.partial(loss, functools.partial(causal_conv1d, impl="xla")), argnums=(0, 1, 2), has_aux=True
    )(x, w, state)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5, rtol=1e-5)
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-4, rtol=1e-4)


def test_gla_forward_and_backward_strict():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.standard_normal((1, 12, 1, 16)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((1, 12, 1, 8)), jnp.float32)
    g = jnp.asarray(np.log(rng.uniform(0.6, 1.0, (1, 12, 1, 16))), jnp.float32)
    fn = functools.partial(gla, chunk_size=8, interpret=STRICT, block_sizes=BlockSizes(sub_chunk=4))

    def loss(*a):
        o, s = fn(*a)
        return jnp.sum(o) + jnp.sum(s), (o, s)

    grads, (o, s) = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, g)
    ro, rs = gla_reference(q, k, v, g)
    np.testing.assert_allclose(np.asarray(o), ro, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s), rs, atol=1e-5, rtol=1e-5)
    # With NaN-filled scratch, a read of an unwritten state/gradient buffer would surface here; the gradient values
    # themselves are checked against a token scan in test_linear_scan.py (same code path, plain interpreter).
    assert all(bool(jnp.all(jnp.isfinite(d))) for d in grads)
