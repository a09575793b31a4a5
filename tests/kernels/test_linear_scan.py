"""Chunked scan kernel in interpret mode: values vs float64 token loops, gradients vs jax.vjp of a plain
(unchunked, token-by-token) float32 ``lax.scan`` written here, independent of the kernel's chunk math."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import BlockSizes
from pallas_kernels.linear_scan import gla, gla_reference, ssd, ssd_reference
from pallas_kernels.linear_scan import reference as scan_ref

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _gla_inputs(seed, b, t, h, dk, dv, dtype):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, t, h, dv)), dtype)
    g = jnp.asarray(np.log(rng.uniform(0.6, 1.0, (b, t, h, dk))), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    return q, k, v, g, s0


def _token_scan_gla(q, k, v, g, s0, scale):
    """Independent oracle for gradients: the recurrence one token at a time in float32."""

    def step(s, xs):
        qt, kt, vt, gt = xs
        s = jnp.exp(gt)[..., None] * s + kt[..., :, None] * vt[..., None, :]
        return s, jnp.einsum("bhk,bhkv->bhv", scale * qt, s)

    xs = tuple(jnp.moveaxis(a.astype(jnp.float32), 1, 0) for a in (q, k, v, g))
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1), s


# (B, T, H, Dk, Dv, chunk, state, dtype): T < chunk, T % chunk != 0, several chunks, bf16
# (B, T, H, Dk, Dv, chunk, state, dtype, layout): T < chunk, T % chunk != 0, several chunks, bf16, both layouts
GLA_CASES = [
    (1, 5, 2, 16, 8, 16, False, jnp.float32, "head_major"),
    (2, 37, 2, 16, 8, 16, True, jnp.float32, "head_major"),
    (2, 37, 2, 16, 8, 16, True, jnp.float32, "time_major"),
    (1, 40, 1, 8, 16, 16, True, jnp.bfloat16, "auto"),
]


@pytest.mark.parametrize("case", GLA_CASES, ids=str)
def test_gla_values(case):
    b, t, h, dk, dv, chunk, use_state, dtype, layout = case
    q, k, v, g, s0 = _gla_inputs(0, b, t, h, dk, dv, dtype)
    s0 = s0 if use_state else None
    bs = BlockSizes(sub_chunk=8, scan_layout=layout)
    fn = jax.jit(lambda *a: gla(*a, initial_state=s0, chunk_size=chunk, interpret=True, block_sizes=bs))
    o, sf = fn(q, k, v, g)
    chex.assert_shape(o, (b, t, h, dv))
    chex.assert_shape(sf, (b, h, dk, dv))
    ro, rs = gla_reference(
        *(np.asarray(a.astype(jnp.float32)) for a in (q, k, v, g)), initial_state=None if s0 is None else np.asarray(s0)
    )
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(o, np.float64), ro, atol=tol * np.abs(ro).max(), rtol=tol)
    np.testing.assert_allclose(np.asarray(sf, np.float64), rs, atol=tol * np.abs(rs).max(), rtol=tol)


@pytest.mark.parametrize(
    "layout,dtype",
    [("head_major", jnp.float32), ("time_major", jnp.float32), ("head_major", jnp.bfloat16)],
    ids=["head_major-f32", "time_major-f32", "head_major-bf16"],
)
def test_gla_gradients(layout, dtype):
    b, t, h, dk, dv = 1, 13, 2, 16, 8  # two chunks of 8 (the second padded), two sub-chunks of 4 each
    q, k, v, g, s0 = _gla_inputs(1, b, t, h, dk, dv, dtype)
    rng = np.random.default_rng(3)
    do = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    ds = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    scale = dk**-0.5

    def loss(fn, q, k, v, g, s0):
        o, s = fn(q, k, v, g, s0)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s * ds)

    bs = BlockSizes(sub_chunk=4, scan_layout=layout)
    kern = lambda q, k, v, g, s0: gla(q, k, v, g, initial_state=s0, chunk_size=8, interpret=True, block_sizes=bs)
    # the oracle sees the same (rounded) inputs in float32; its gradients are rounded to the input dtype at the end
    oracle = lambda q, k, v, g, s0: _token_scan_gla(q, k, v, g, s0, scale)
    gk = jax.jit(jax.grad(functools.partial(loss, kern), argnums=range(5)))(q, k, v, g, s0)
    go = jax.jit(jax.grad(functools.partial(loss, oracle), argnums=range(5)))(q, k, v, g, s0)
    tol = 1e-4 if dtype == jnp.float32 else 1e-2
    for name, a, r in zip(("dq", "dk", "dv", "dlog_gate", "dstate"), gk, go):
        chex.assert_shape(a, r.shape)
        assert a.dtype == r.dtype, name
        r32 = np.asarray(r.astype(jnp.float32))
        np.testing.assert_allclose(
            np.asarray(a.astype(jnp.float32)),
            r32,
            atol=tol * max(1.0, float(np.abs(r32).max())),
            rtol=tol,
            err_msg=name,
        )


@pytest.mark.parametrize("scalar", [False, True])
def test_chunk_backward_math_matches_autodiff(scalar):
    """The reverse-time kernel's per-chunk math equals jax.vjp of the forward chunk math (XLA, no kernel)."""
    rng = np.random.default_rng(5)
    c, dk, dv = 8, 8, 16  # two sub-chunks of 4: one off-diagonal pair and the diagonal blocks
    q, k = (jnp.asarray(rng.standard_normal((c, dk)), jnp.float32) for _ in range(2))
    v, do = (jnp.asarray(rng.standard_normal((c, dv)), jnp.float32) for _ in range(2))
    b = jnp.cumsum(jnp.asarray(np.log(rng.uniform(0.5, 1.0, (c, 1 if scalar else dk))), jnp.float32), axis=0)
    st, dst = (jnp.asarray(rng.standard_normal((dv, dk)), jnp.float32) for _ in range(2))

    def fwd(st, q, k, v, b):
        parts, s = scan_ref.chunk_step(st, q, k, v, b, b.T if scalar else None, scale=0.7, sub_chunk=4)
        return jnp.concatenate(parts, axis=0), s

    dst_in, dq, dk_, dv_, db = jax.jit(lambda *a: jax.vjp(fwd, *a)[1]((do, dst)))(st, q, k, v, b)
    mine = jax.jit(functools.partial(scan_ref.chunk_step_bwd, scale=0.7, sub_chunk=4, scalar=scalar))(
        st, dst, q, k, v, b, do
    )
    for name, a, r in zip(("dq", "dk", "dv", "db", "dstate"), mine, (dq, dk_, dv_, db, dst_in)):
        chex.assert_shape(a, r.shape)
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5, rtol=1e-5, err_msg=name)


def _ssd_inputs(seed, b, t, h, p, g, n, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, t, h, p)), dtype)
    dt = jnp.asarray(rng.uniform(0.01, 0.3, (b, t, h)), jnp.float32)
    a = jnp.asarray(-rng.uniform(0.5, 4.0, h), jnp.float32)
    bm, cm = (jnp.asarray(rng.standard_normal((b, t, g, n)), dtype) for _ in range(2))
    d = jnp.asarray(rng.standard_normal(h), jnp.float32)
    h0 = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)
    return x, dt, a, bm, cm, d, h0


SSD_CASES = [
    (1, 6, 2, 8, 1, 16, 16, False, jnp.float32, "auto"),  # T < chunk
    (2, 45, 4, 8, 2, 16, 16, True, jnp.float32, "head_major"),  # groups, T % chunk != 0
    (2, 45, 4, 8, 2, 16, 16, True, jnp.float32, "time_major"),  # groups read in place through h // rep
    (1, 40, 2, 16, 1, 8, 32, True, jnp.bfloat16, "auto"),
]


@pytest.mark.parametrize("case", SSD_CASES, ids=str)
def test_ssd_values(case):
    b, t, h, p, grp, n, chunk, use_state, dtype, layout = case
    x, dt, a, bm, cm, d, h0 = _ssd_inputs(0, b, t, h, p, grp, n, dtype)
    h0 = h0 if use_state else None
    bs = BlockSizes(scan_layout=layout)
    y, hf = jax.jit(lambda *z: ssd(*z, initial_state=h0, chunk_size=chunk, interpret=True, block_sizes=bs))(
        x, dt, a, bm, cm, d
    )
    chex.assert_shape(y, (b, t, h, p))
    chex.assert_shape(hf, (b, h, p, n))
    ry, rh = ssd_reference(
        *(np.asarray(z.astype(jnp.float32)) for z in (x, dt, a, bm, cm, d)),
        initial_state=None if h0 is None else np.asarray(h0),
    )
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(y, np.float64), ry, atol=tol * np.abs(ry).max(), rtol=tol)
    np.testing.assert_allclose(np.asarray(hf, np.float64), rh, atol=tol * np.abs(rh).max(), rtol=tol)


def test_ssd_gradients():
    b, t, h, p, grp, n = 1, 19, 4, 8, 2, 16  # two groups of two heads, time-major (q/k gradients summed per group)
    x, dt, a, bm, cm, d, h0 = _ssd_inputs(2, b, t, h, p, grp, n, jnp.float32)
    rng = np.random.default_rng(4)
    dy = jnp.asarray(rng.standard_normal((b, t, h, p)), jnp.float32)

    def oracle(x, dt, a, bm, cm, d, h0):
        def step(hs, xs):
            xt, dtt, bt, ct = xs
            hs = jnp.exp(dtt * a)[..., None, None] * hs + (dtt[..., None] * xt)[..., None] * bt[:, :, None, :]
            return hs, jnp.einsum("bhpn,bhn->bhp", hs, ct) + d[:, None] * xt

        rep = h // grp
        xs = (
            jnp.moveaxis(x, 1, 0),
            jnp.moveaxis(dt, 1, 0),
            jnp.moveaxis(jnp.repeat(bm, rep, axis=2), 1, 0),
            jnp.moveaxis(jnp.repeat(cm, rep, axis=2), 1, 0),
        )
        hs, y = jax.lax.scan(step, h0, xs)
        return jnp.moveaxis(y, 0, 1), hs

    bs = BlockSizes(scan_layout="time_major")
    kern = lambda *z: ssd(*z[:6], initial_state=z[6], chunk_size=8, interpret=True, block_sizes=bs)
    loss = lambda fn, *z: jnp.sum(fn(*z)[0] * dy) + jnp.sum(fn(*z)[1])
    args = (x, dt, a, bm, cm, d, h0)
    gk = jax.jit(jax.grad(functools.partial(loss, kern), argnums=range(7)))(*args)
    go = jax.jit(jax.grad(functools.partial(loss, oracle), argnums=range(7)))(*args)
    for name, ga, gr in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dstate"), gk, go):
        chex.assert_shape(ga, gr.shape)
        np.testing.assert_allclose(
            np.asarray(ga), np.asarray(gr), atol=1e-4 * max(1.0, float(jnp.abs(gr).max())), rtol=1e-4, err_msg=name
        )


def test_bad_arguments_raise():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="log_gate"):
        gla(q, q, q, jnp.zeros((1, 8, 2, 8)), interpret=True)
    with pytest.raises(ValueError, match="chunk_size"):
        gla(q, q, q, q, chunk_size=0, interpret=True)
    with pytest.raises(ValueError, match="groups"):
        ssd(
            jnp.zeros((1, 8, 3, 4)),
            jnp.zeros((1, 8, 3)),
            jnp.zeros(3),
            jnp.zeros((1, 8, 2, 4)),
            jnp.zeros((1, 8, 2, 4)),
            interpret=True,
        )
