"""The Mosaic GPU (wgmma) scan kernels (scalar gates: SSD; vector gates: GLA), run by the Mosaic GPU interpreter on
CPU (``InterpretGPUParams``: it simulates shared memory, TMA copies, barriers and wgmma, but not register layouts,
swizzling or timing), against float64 token loops. Lowering for the real target is in ``test_export.py``. No GPU was
available: these values are the interpreter's, not the device's."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

from canon_jax.ops import gla as ops_gla
from pallas_kernels.common import BlockSizes
from pallas_kernels.linear_scan import (
    gla,
    gla_gpu_gates_ok,
    gla_reference,
    gpu_common,
    gpu_fwd,
    gpu_plan,
    gpu_reference,
    ssd,
    ssd_reference,
)

# wgmma operands are bfloat16 (q, k, v = dt*x, the state and the masked scores are rounded to 8 mantissa bits,
# relative error 2^-9 each) with float32 accumulation: errors of a few 1e-3 of the output's scale are expected.
TOL = 1.5e-2


def _inputs(seed, b, t, h, p, g, n, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, t, h, p)), dtype)
    dt = jnp.asarray(rng.uniform(0.01, 0.3, (b, t, h)), jnp.float32)
    a = jnp.asarray(-rng.uniform(0.5, 4.0, h), jnp.float32)
    bm, cm = (jnp.asarray(0.5 * rng.standard_normal((b, t, g, n)), dtype) for _ in range(2))
    d = jnp.asarray(rng.standard_normal(h), jnp.float32)
    h0 = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)
    return x, dt, a, bm, cm, d, h0


# (batch, T, heads, P, groups, N, chunk, block_dv, initial state, dtype)
CASES = [
    # 3 chunks (both buffers reused), T % chunk != 0, 2 Dv blocks, 2 heads per group
    (1, 150, 2, 128, 1, 64, 64, 64, True, jnp.float32),
    (1, 64, 2, 64, 2, 128, 64, 64, False, jnp.bfloat16),  # one chunk, a group per head, Dk = 128
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_ssd_gpu_kernel_values(case):
    b, t, h, p, grp, n, chunk, bdv, use_state, dtype = case
    x, dt, a, bm, cm, d, h0 = _inputs(0, b, t, h, p, grp, n, dtype)
    h0 = h0 if use_state else None
    bs = BlockSizes(block_dv=bdv)
    # detect_races: the interpreter's race detector over shared-memory accesses (TMA copies, loads, stores)
    params = InterpretGPUParams(detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise")
    y, hf = ssd(
        x, dt, a, bm, cm, d, initial_state=h0, chunk_size=chunk, block_sizes=bs, backend="gpu", interpret=params
    )
    assert not get_races().races_found
    chex.assert_shape(y, (b, t, h, p))
    chex.assert_shape(hf, (b, h, p, n))
    assert y.dtype == dtype and hf.dtype == jnp.float32
    ry, rh = ssd_reference(
        *(np.asarray(z.astype(jnp.float32)) for z in (x, dt, a, bm, cm, d)),
        initial_state=None if h0 is None else np.asarray(h0),
    )
    np.testing.assert_allclose(np.asarray(y, np.float64), ry, atol=TOL * np.abs(ry).max(), rtol=TOL)
    np.testing.assert_allclose(np.asarray(hf, np.float64), rh, atol=TOL * np.abs(rh).max(), rtol=TOL)


def test_ssd_gpu_chunk_over_shared_memory_runs_at_the_planned_chunk():
    """Mamba2's chunk of 256 at N = 128 does not fit an sm_90 block (``gpu_plan.ssd_chunk``): the op runs the kernels at
    64 instead, so its output is the explicit-64 run's, bit for bit, and matches the float64 loop."""
    x, dt, a, bm, cm, d, h0 = _inputs(1, 1, 150, 2, 64, 1, 128, jnp.bfloat16)
    params = InterpretGPUParams(detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise")
    run = lambda c: ssd(x, dt, a, bm, cm, d, initial_state=h0, chunk_size=c, backend="gpu", interpret=params)
    (y, hf), (y64, hf64) = run(256), run(64)
    assert not get_races().races_found
    chex.assert_shape((y, hf), ((1, 150, 2, 64), (1, 2, 64, 128)))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y64, np.float32))
    np.testing.assert_array_equal(np.asarray(hf), np.asarray(hf64))
    ry, rh = ssd_reference(
        *(np.asarray(z.astype(jnp.float32)) for z in (x, dt, a, bm, cm, d)), initial_state=np.asarray(h0)
    )
    np.testing.assert_allclose(np.asarray(y, np.float64), ry, atol=TOL * np.abs(ry).max(), rtol=TOL)
    np.testing.assert_allclose(np.asarray(hf, np.float64), rh, atol=TOL * np.abs(rh).max(), rtol=TOL)


def test_scalar_scan_xla_backward():
    """``jax.vjp`` of ``gpu_reference.scalar_scan_xla`` (the XLA chunked path with the GPU op's argument layout, a
    reference for the Mosaic GPU backward kernels of ``gpu_bwd``) against autodiff of a token-by-token
    scan. Two heads share one q/k group; three chunks (XLA takes any chunk, so the sizes are small)."""
    b, t, h, grp, dk, dv, chunk = 1, 24, 2, 1, 8, 16, 8
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.standard_normal((b, t, grp, dk)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    g = jnp.asarray(-rng.uniform(0.0, 0.3, (b, t, h)), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    do = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    dsf = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)

    def oracle(q, k, v, g, s0):
        qh, kh = jnp.repeat(q, h // grp, axis=2), jnp.repeat(k, h // grp, axis=2)

        def step(st, xs):
            qt, kt, vt, gt = xs
            st = jnp.exp(gt)[..., None, None] * st + kt[..., :, None] * vt[..., None, :]
            return st, jnp.einsum("bhk,bhkv->bhv", qt, st)

        st, o = jax.lax.scan(step, s0, tuple(jnp.moveaxis(a, 1, 0) for a in (qh, kh, v, g)))
        return jnp.moveaxis(o, 0, 1), st

    args = (q, k, v, g, s0)
    want = jax.jit(lambda *a: jax.vjp(oracle, *a)[1]((do, dsf)))(*args)
    got = jax.jit(lambda *a: jax.vjp(lambda *b: gpu_reference.scalar_scan_xla(*b, chunk), *a)[1]((do, dsf)))(*args)
    for name, ga, gr in zip(("dq", "dk", "dv", "dg", "ds0"), got, want):
        chex.assert_shape(ga, gr.shape)
        np.testing.assert_allclose(
            np.asarray(ga), np.asarray(gr), atol=1e-4 * max(1.0, float(jnp.abs(gr).max())), rtol=1e-4, err_msg=name
        )


# GLA: the same bfloat16 wgmma operands (the gate factors are float32 until each operand is rounded once) with
# float32 accumulation; bfloat16 inputs also round the output (2^-9 relative), hence a slightly wider bound.
GLA_TOL = {jnp.float32: 1.5e-2, jnp.bfloat16: 2e-2}


def _gla_inputs(seed, b, t, h, dk, dv, dtype):
    """Half of the key channels decay strongly (log-gates down to -5 per token, so a chunk's cumulative gate reaches
    about -160 and any unbounded exp(-b) factor would overflow float32), half barely decay (long memory through the
    state across chunks)."""
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, t, h, dv)), dtype)
    strong = rng.uniform(-5.0, 0.0, (b, t, h, dk // 2))
    weak = rng.uniform(-0.05, 0.0, (b, t, h, dk - dk // 2))
    g = jnp.asarray(np.concatenate([strong, weak], axis=-1), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    return q, k, v, g, s0


# (batch, T, heads, Dk, Dv, chunk, sub_chunk, block_dv, initial state, dtype)
GLA_CASES = [
    # 3 chunks (both buffers reused), T % chunk != 0, 2 Dv blocks, 2 heads, 4 sub-chunks of 16
    (1, 150, 2, 64, 128, 64, 16, 64, True, jnp.float32),
    # Dk = 128 (the paper's), 3 chunks, T % chunk != 0, 2 Dv blocks, bfloat16 inputs and output
    (1, 130, 1, 128, 128, 64, 16, 64, True, jnp.bfloat16),
    # 8 sub-chunks of 8 (more sub-chunk pairs), 2 batch rows, no initial state, 2 chunks
    (2, 100, 1, 64, 64, 64, 8, 64, False, jnp.float32),
]


@pytest.mark.parametrize("case", GLA_CASES, ids=str)
def test_gla_gpu_kernel_values(case):
    b, t, h, dk, dv, chunk, sub, bdv, use_state, dtype = case
    q, k, v, g, s0 = _gla_inputs(1, b, t, h, dk, dv, dtype)
    s0 = s0 if use_state else None
    params = InterpretGPUParams(detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise")
    o, sf = gla(
        q,
        k,
        v,
        g,
        initial_state=s0,
        chunk_size=chunk,
        block_sizes=BlockSizes(block_dv=bdv, sub_chunk=sub),
        backend="gpu",
        interpret=params,
    )
    assert not get_races().races_found
    chex.assert_shape(o, (b, t, h, dv))
    chex.assert_shape(sf, (b, h, dk, dv))
    assert o.dtype == dtype and sf.dtype == jnp.float32
    ro, rs = gla_reference(
        *(np.asarray(z.astype(jnp.float32)) for z in (q, k, v, g)), initial_state=None if s0 is None else np.asarray(s0)
    )
    tol = GLA_TOL[dtype]
    np.testing.assert_allclose(np.asarray(o, np.float64), ro, atol=tol * np.abs(ro).max(), rtol=tol)
    np.testing.assert_allclose(np.asarray(sf, np.float64), rs, atol=tol * np.abs(rs).max(), rtol=tol)


def test_gla_gpu_backward_path_values():
    """``gpu_reference.vector_scan_xla`` (the float32 XLA form of the GPU kernel's factorisation, a reference for the
    kernels of ``gpu_bwd``) against the float64 loop: 3 chunks, 4 sub-chunks of 16, two
    heads, an initial state, gates down to -5 per token."""
    b, t, h, dk, dv = 2, 192, 2, 64, 32
    q, k, v, g, s0 = _gla_inputs(4, b, t, h, dk, dv, jnp.float32)
    o, sf = jax.jit(lambda *a: gpu_reference.vector_scan_xla(*a, 0.125, 64, 16))(q, k, v, g, s0)
    chex.assert_shape(o, (b, t, h, dv))
    chex.assert_shape(sf, (b, h, dk, dv))
    ro, rs = gla_reference(q, k, v, g, scale=0.125, initial_state=s0)
    np.testing.assert_allclose(np.asarray(o, np.float64), ro, atol=1e-5 * np.abs(ro).max(), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(sf, np.float64), rs, atol=1e-5 * np.abs(rs).max(), rtol=1e-4)


# --- backward kernels (gpu_bwd) --------------------------------------------------------------------------------------
# The backward's wgmma operands are bfloat16 as in the forward (q, k, v, dO, the recomputed states S_c and their
# gradients X_c, the masked dA / dA^T and A^T, the factor-scaled qm / km), with float32 accumulation: each value is
# rounded to 8 mantissa bits (2^-9 relative) once or twice on its way, so errors of a few 1e-3 of each gradient's
# scale are expected (measured 2.5-5e-3 at these shapes); 1.5e-2 of the scale leaves room for the sums over chunks.
# bfloat16 inputs also round the returned gradients (2^-9) and the reference sees the rounded inputs.
BWD_TOL = {jnp.float32: 1.5e-2, jnp.bfloat16: 2e-2}
STRICT = dict(detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise")


def _close(got, want, tol, name):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol, err_msg=name)
    return float(np.abs(got - want).max() / scale)


def _f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_state_pass_values(reverse):
    """``gpu_bwd.state_pass`` (3 chunks, so both buffers are reused; 2 Dv blocks; 2 heads) against a float64 loop over
    the chunks, on the same bfloat16 operands: the stored states are the value before each chunk's update (rounded to
    bfloat16), the final value is float32."""
    from pallas_kernels.linear_scan import gpu_bwd

    b, h, dk, dv, c, n = 1, 2, 64, 128, 64, 3
    rng = np.random.default_rng(7)
    lt = jnp.asarray(rng.standard_normal((b, h, dk, n * c)), jnp.bfloat16)
    r = jnp.asarray(rng.standard_normal((b, n * c, h, dv)), jnp.bfloat16)
    dec = jnp.asarray(rng.uniform(0.3, 1.0, (b, h, n, dk)), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    states, final = gpu_bwd.state_pass(
        lt, r, dec, s0, chunk=c, block_dv=64, reverse=reverse, interpret=InterpretGPUParams(**STRICT)
    )
    assert not get_races().races_found
    chex.assert_shape(states, (b, h, n, dk, dv))
    chex.assert_shape(final, (b, h, dk, dv))
    assert states.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    lf, rf, x = _f64(lt), _f64(r), np.asarray(s0, np.float64)
    want = np.zeros(states.shape)
    for ci in reversed(range(n)) if reverse else range(n):
        want[:, :, ci] = x
        x = _f64(dec)[:, :, ci, :, None] * x + np.einsum(
            "bhdc,bche->bhde", lf[..., ci * c : (ci + 1) * c], rf[:, ci * c : (ci + 1) * c]
        )
    _close(states, want, 2**-8, "states")  # bfloat16 rounding of the stored values only
    _close(final, x, 1e-5, "final")


def _chunk_grads_ref(qh, k, v, do, s, x, b):
    """float64 per-chunk gradients (plain math, no factorisation). qh, k, b: ``[B, n, C, H, Dk]`` (b: cumulative
    chunk-local log-gates per key channel); v, do: ``[B, n, C, H, Dv]``; s, x: ``[B, H, n, Dk, Dv]``.
    Returns dq̂, dk ``[B, n, C, H, Dk]`` and dv ``[B, n, C, H, Dv]``."""
    c = qh.shape[2]
    tri = np.tril(np.ones((c, c), bool))
    dec = np.where(
        tri[None, None, :, :, None, None],
        np.exp(np.where(tri[None, None, :, :, None, None], b[:, :, :, None] - b[:, :, None, :], 0.0)),
        0.0,
    )  # [B, n, t, s, H, Dk]
    b_last = b[:, :, -1:]
    s, x = np.moveaxis(s, 1, 2), np.moveaxis(x, 1, 2)  # [B, n, H, Dk, Dv]
    da = np.einsum("bnthe,bnshe->bntsh", do, v)
    a = np.einsum("bnthd,bnshd,bntshd->bntsh", qh, k, dec)
    dq = np.exp(b) * np.einsum("bnhde,bnthe->bnthd", s, do) + np.einsum("bntsh,bnshd,bntshd->bnthd", da, k, dec)
    dk = np.exp(b_last - b) * np.einsum("bnhde,bnshe->bnshd", x, v) + np.einsum(
        "bntsh,bnthd,bntshd->bnshd", da, qh, dec
    )
    dv = np.einsum("bntsh,bnthe->bnshe", a, do) + np.einsum("bnhde,bnshd->bnshe", x, k * np.exp(b_last - b))
    return dq, dk, dv


def _bwd_kernel_operands(seed, b, t, h, dk, dv, n_states):
    rng = np.random.default_rng(seed)
    v, do = (jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.bfloat16) for _ in range(2))
    s, x = (jnp.asarray(rng.standard_normal((b, h, n_states, dk, dv)), jnp.bfloat16) for _ in range(2))
    return rng, v, do, s, x


def test_ssd_bwd_kernels_values():
    """``gpu_bwd.ssd_grads_dqk`` / ``ssd_grads_dv`` on random bfloat16 operands (2 chunks, 2 Dv blocks, 2 heads
    sharing one q/k group) against the float64 per-chunk formulas (one gate per head)."""
    from pallas_kernels.linear_scan import gpu_bwd

    b, h, grp, dk, dv, c, n = 1, 2, 1, 64, 128, 64, 2
    t = n * c
    rng, v, do, s, x = _bwd_kernel_operands(8, b, t, h, dk, dv, n)
    q, k = (jnp.asarray(0.5 * rng.standard_normal((b, t, grp, dk)), jnp.bfloat16) for _ in range(2))
    g = jnp.asarray(-rng.uniform(0.0, 0.2, (b, t, h)), jnp.float32)
    bc, eb, ek, _ = gpu_fwd.prep_gates(g, c)
    tr = lambda a: jnp.transpose(a, (0, 2, 3, 1))
    st, xt = jnp.swapaxes(s, 3, 4), jnp.swapaxes(x, 3, 4)
    params = InterpretGPUParams(**STRICT)
    dq, dk_ = gpu_bwd.ssd_grads_dqk(
        q, k, v, tr(v), do, tr(do), st, xt, bc, eb, ek, chunk=c, block_dv=64, rep=h, interpret=params
    )
    assert not get_races().races_found
    dv_ = gpu_bwd.ssd_grads_dv(k, tr(q), do, x, bc, ek, chunk=c, block_dv=64, rep=h, interpret=params)
    assert not get_races().races_found
    chex.assert_shape((dq, dk_), (dv // 64, b, t, h, dk))
    chex.assert_shape(dv_, (b, t, h, dv))
    ch = lambda a: _f64(a).reshape(b, n, c, *a.shape[2:])
    bb = np.broadcast_to(np.asarray(jnp.swapaxes(bc, 1, 2), np.float64)[..., None], (b, t, h, dk))
    rep = lambda a: np.repeat(a, h, axis=3)
    want = _chunk_grads_ref(rep(ch(q)), rep(ch(k)), ch(v), ch(do), _f64(s), _f64(x), bb.reshape(b, n, c, h, dk))
    for name, got, ref in zip(("dq", "dk", "dv"), (dq.sum(0), dk_.sum(0), dv_), want):
        _close(got, ref.reshape(got.shape), BWD_TOL[jnp.float32], name)


def test_gla_bwd_kernels_values():
    """``gpu_bwd.gla_grads_dqk`` / ``gla_grads_dv`` (gradients w.r.t. the factorised ``qm`` / ``km``, 4 sub-chunks of
    16, 2 chunks, 2 Dv blocks) against the float64 per-chunk formulas with per-channel decay ``exp(b_t - b_s)`` and no
    factorisation: ``q̂ = qm exp(m - b)``, ``k = km exp(b - m)`` (m the sub-chunk references), ``dqm = dq̂ exp(m -
    b)``, ``dkm = dk exp(b - m)``. Half the key channels decay by up to 5 per token."""
    from pallas_kernels.linear_scan import gpu_bwd

    b, h, dk, dv, c, sub, n = 1, 1, 64, 128, 64, 16, 2
    t = n * c
    rng, v, do, s, x = _bwd_kernel_operands(9, b, t, h, dk, dv, n)
    q, k, _, g, _ = _gla_inputs(10, b, t, h, dk, 64, jnp.float32)
    qm, kmt, fac = gpu_fwd.prep_vector_gates(q, k, g, scale=0.25, chunk=c, sub=sub)
    km = jnp.transpose(kmt, (0, 3, 1, 2))
    tr = lambda a: jnp.transpose(a, (0, 2, 3, 1))
    params = InterpretGPUParams(**STRICT)
    dqm, dkm = gpu_bwd.gla_grads_dqk(
        qm,
        km,
        v,
        tr(v),
        do,
        tr(do),
        jnp.swapaxes(s, 3, 4),
        jnp.swapaxes(x, 3, 4),
        fac,
        chunk=c,
        sub=sub,
        block_dv=64,
        interpret=params,
    )
    assert not get_races().races_found
    dv_ = gpu_bwd.gla_grads_dv(km, tr(qm), do, x, fac, chunk=c, sub=sub, block_dv=64, interpret=params)
    assert not get_races().races_found
    chex.assert_shape((dqm, dkm), (dv // 64, b, t, h, dk))
    chex.assert_shape(dv_, (b, t, h, dv))
    ch = lambda a: _f64(a).reshape(b, n, c, *a.shape[2:])
    bc = np.cumsum(ch(g), axis=2)
    m = bc.reshape(b, n, c // sub, sub, h, dk)[:, :, :, (sub - 1) // 2]
    rel = bc - np.repeat(m, sub, axis=2)  # b_t - m_i
    dq, dk_, dv_ref = _chunk_grads_ref(ch(qm) * np.exp(-rel), ch(km) * np.exp(rel), ch(v), ch(do), _f64(s), _f64(x), bc)
    for name, got, ref in (
        ("dqm", dqm.sum(0), dq * np.exp(-rel)),
        ("dkm", dkm.sum(0), dk_ * np.exp(rel)),
        ("dv", dv_, dv_ref),
    ):
        _close(got, ref.reshape(got.shape), BWD_TOL[jnp.float32], name)


def test_gate_gradient_identity():
    """The gate gradient of ``gpu_bwd`` without kernels: exact float64 per-chunk gradients (``_chunk_grads_ref``) and
    states, ``db = q̂ ⊙ dq̂ - k ⊙ dk``, then ``gpu_bwd._gate_grad`` (``Σ_v S_{c+1} ⊙ X_c`` on each chunk's last row,
    reverse sum inside each chunk) and the whole-sequence form (``Σ_v S_T ⊙ dS_T`` on the last row, reverse sum over
    all of T) both against ``jax.vjp`` of the float32 token loop (4 chunks, gates to -5 per token)."""
    from pallas_kernels.linear_scan import gpu_bwd

    b, t, h, dk, dv, c = 1, 128, 2, 8, 8, 32
    n = t // c
    q, k, v, g, s0 = _gla_inputs(13, b, t, h, dk, dv, jnp.float32)
    rng = np.random.default_rng(14)
    do = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    dsf = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    want = jax.jit(lambda *a: jax.vjp(lambda *z: _gla_loop(*z, 0.5), *a)[1]((do, dsf))[3])(q, k, v, g, s0)
    ch = lambda a: _f64(a).reshape(b, n, c, h, a.shape[-1])
    qh, kc, vc, doc, bc = ch(q) * 0.5, ch(k), ch(v), ch(do), np.cumsum(ch(g), axis=2)
    b_last = bc[:, :, -1]  # [B, n, H, Dk]
    s_st, x_st = np.zeros((b, h, n, dk, dv)), np.zeros((b, h, n, dk, dv))
    st = _f64(s0)
    for ci in range(n):
        s_st[:, :, ci] = st
        st = np.exp(b_last[:, ci])[..., None] * st + np.einsum(
            "bchd,bche->bhde", kc[:, ci] * np.exp(b_last[:, ci, None] - bc[:, ci]), vc[:, ci]
        )
    xs = _f64(dsf)
    for ci in reversed(range(n)):
        x_st[:, :, ci] = xs
        xs = np.exp(b_last[:, ci])[..., None] * xs + np.einsum(
            "bchd,bche->bhde", qh[:, ci] * np.exp(bc[:, ci]), doc[:, ci]
        )
    dq, dk_, _ = _chunk_grads_ref(qh, kc, vc, doc, s_st, x_st, bc)
    db = (qh * dq - kc * dk_).reshape(b, t, h, dk)
    per_chunk = gpu_bwd._gate_grad(
        jnp.asarray(db, jnp.float32),
        jnp.asarray(s_st, jnp.float32),
        jnp.asarray(st, jnp.float32),
        jnp.asarray(x_st, jnp.float32),
        c,
    )
    whole = db.copy()
    whole[:, -1] += np.sum(st * _f64(dsf), axis=-1)
    whole = np.flip(np.cumsum(np.flip(whole, 1), axis=1), 1)
    for name, got in (("per-chunk", per_chunk), ("whole-sequence", whole)):
        _close(got, want, 1e-4, name)


def _ssd_loop(x, dt, a, bm, cm, d, h0):
    """float32 token-by-token SSD (independent of the chunked code): h [B, H, P, N]."""
    rep = x.shape[2] // bm.shape[2]
    bh, chh = jnp.repeat(bm, rep, axis=2), jnp.repeat(cm, rep, axis=2)

    def step(hs, xs):
        xt, dtt, bt, ct = xs
        hs = jnp.exp(dtt * a)[..., None, None] * hs + (dtt[..., None] * xt)[..., None] * bt[..., None, :]
        return hs, jnp.einsum("bhpn,bhn->bhp", hs, ct) + d[:, None] * xt

    hf, y = jax.lax.scan(step, h0, tuple(jnp.moveaxis(z, 1, 0) for z in (x, dt, bh, chh)))
    return jnp.moveaxis(y, 0, 1), hf


def _gla_loop(q, k, v, g, s0, scale):
    """float32 token-by-token GLA: S [B, H, Dk, Dv]."""

    def step(st, xs):
        qt, kt, vt, gt = xs
        st = jnp.exp(gt)[..., None] * st + kt[..., :, None] * vt[..., None, :]
        return st, jnp.einsum("bhk,bhkv->bhv", scale * qt, st)

    st, o = jax.lax.scan(step, s0, tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g)))
    return jnp.moveaxis(o, 0, 1), st


def _weighted_grad(fn, wo, ws, n):
    """Gradient of ``sum(out * wo) + sum(final_state * ws)`` w.r.t. the first n arguments (both outputs matter)."""

    def f(*a):
        out, sf = fn(*a)
        return jnp.sum(out.astype(jnp.float32) * wo) + jnp.sum(sf * ws)

    return jax.jit(jax.grad(f, argnums=tuple(range(n))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ssd_gpu_grad_kernels(dtype):
    """``jax.grad`` through ``ssd(backend="gpu")`` in the interpreter, forward *and* backward on the Mosaic GPU
    kernels (state passes, ``ssd_scan_bwd_dqk``, ``ssd_scan_bwd_dv``), against ``jax.grad`` of a float32 token loop:
    x, dt, A, B, C, D and the initial state; 2 heads sharing one B/C group, T = 150 (3 chunks of 64, padded), 2 Dv
    blocks, loss on y and the final state."""
    b, t, h, p, grp, n = 1, 150, 2, 128, 1, 64
    x, dt, a, bm, cm, d, h0 = _inputs(11, b, t, h, p, grp, n, dtype)
    rng = np.random.default_rng(12)
    wo = jnp.asarray(rng.standard_normal((b, t, h, p)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)
    args = (x, dt, a, bm, cm, d, h0)
    got = _weighted_grad(
        lambda *z: ssd(
            *z[:6],
            initial_state=z[6],
            chunk_size=64,
            backend="gpu",
            block_sizes=BlockSizes(block_dv=64),
            interpret=gpu_common.interpret_params(),
        ),
        wo,
        ws,
        7,
    )(*args)
    up = tuple(z.astype(jnp.float32) for z in args)
    want = _weighted_grad(_ssd_loop, wo, ws, 7)(*up)
    for name, ga, gr, z in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dh0"), got, want, args):
        chex.assert_shape(ga, z.shape)
        assert ga.dtype == z.dtype, name
        _close(ga, gr, BWD_TOL[dtype], name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gla_gpu_grad_kernels(dtype):
    """``jax.grad`` through ``gla(backend="gpu")`` in the interpreter, forward and backward on the Mosaic GPU kernels
    (state passes, ``gla_scan_bwd_dqk``, ``gla_scan_bwd_dv``), against ``jax.grad`` of a float32 token loop: q, k, v,
    the log-gates (half the channels down to -5 per token) and the initial state; T = 130 (3 chunks, padded), 4
    sub-chunks, 2 Dv blocks, loss on o and the final state."""
    b, t, h, dk, dv = 1, 130, 1, 64, 128
    q, k, v, g, s0 = _gla_inputs(2, b, t, h, dk, dv, dtype)
    rng = np.random.default_rng(5)
    wo = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    args = (q, k, v, g, s0)
    got = _weighted_grad(
        lambda *a: gla(
            *a[:4],
            initial_state=a[4],
            chunk_size=64,
            backend="gpu",
            block_sizes=BlockSizes(block_dv=64, sub_chunk=16),
            interpret=gpu_common.interpret_params(),
        ),
        wo,
        ws,
        5,
    )(*args)
    want = _weighted_grad(lambda *a: _gla_loop(*a, dk**-0.5), wo, ws, 5)(*(z.astype(jnp.float32) for z in args))
    for name, ga, gr, z in zip(("dq", "dk", "dv", "dg", "ds0"), got, want, args):
        chex.assert_shape(ga, z.shape)
        assert ga.dtype == z.dtype, name
        _close(ga, gr, BWD_TOL[dtype], name)


def test_gla_gpu_grad_matches_xla():
    """The kernel backward through ``gla(backend="gpu")`` against autodiff of ``canon_jax.ops.gla(impl="xla")``, a
    separately written chunked implementation: 2 chunks (T = 100), 8 sub-chunks of 8, batch 2, no initial state."""
    b, t, h, dk, dv = 2, 100, 1, 64, 64
    q, k, v, g, _ = _gla_inputs(3, b, t, h, dk, dv, jnp.float32)
    rng = np.random.default_rng(6)
    wo = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    got = _weighted_grad(
        lambda *a: gla(
            *a,
            chunk_size=64,
            backend="gpu",
            block_sizes=BlockSizes(sub_chunk=8),
            interpret=gpu_common.interpret_params(),
        ),
        wo,
        ws,
        4,
    )(q, k, v, g)
    want = _weighted_grad(lambda *a: ops_gla(*a, chunk_size=64, impl="xla"), wo, ws, 4)(q, k, v, g)
    for name, ga, gr in zip(("dq", "dk", "dv", "dg"), got, want):
        chex.assert_shape(ga, gr.shape)
        _close(ga, gr, BWD_TOL[jnp.float32], name)


def test_gpu_kernel_limits_raise_clearly():
    x, dt, a, bm, cm, d, _ = _inputs(0, 1, 8, 2, 16, 1, 16, jnp.float32)
    with pytest.raises(NotImplementedError, match="multiple of 64"):
        ssd(x, dt, a, bm, cm, d, backend="gpu", interpret=gpu_common.interpret_params())
    q = jnp.zeros((1, 64, 1, 16))
    with pytest.raises(NotImplementedError, match="Dk .* must be a multiple of 64"):
        gla(q, q, q, q, backend="gpu", interpret=gpu_common.interpret_params())
    q = jnp.zeros((1, 64, 1, 64))
    with pytest.raises(NotImplementedError, match="multiple of block_dv"):
        gla(q, q, jnp.zeros((1, 64, 1, 96)), q, backend="gpu", interpret=gpu_common.interpret_params())


def test_gla_max_exponent_matches_a_loop():
    """``gpu_plan.gla_max_exponent``: the largest positive exponent of the kernels' sub-chunk-referred q/k factors
    (``b_t - m`` for t before the middle row m, ``m - b_s`` after it), against a loop over sub-chunks."""
    rng = np.random.default_rng(21)
    g = -rng.exponential(1.0, (2, 64, 2, 8)).astype(np.float32)
    for sub in (16, 8):
        want = 0.0
        for lo in range(0, 64, sub):
            b = np.cumsum(g[:, lo : lo + sub], axis=1)
            m = b[:, (sub - 1) // 2]
            want = max(want, float(np.max(b - m[:, None])), float(np.max(m[:, None] - b)))
        np.testing.assert_allclose(float(gpu_plan.gla_max_exponent(jnp.asarray(g), sub=sub)), want, rtol=1e-5)


@pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)
def test_gla_op_guards_the_gpu_kernel_gate_range(monkeypatch):
    """``canon_jax.ops.gla`` on a (simulated) GPU host: the Mosaic GPU kernels (run here by the interpreter) when the
    log-gates keep their sub-chunk factors in range, the exact XLA path when they do not — gates of -30 per token in
    some channels, where the kernel alone returns a wrong (non-finite) output."""
    from pallas_kernels.linear_scan import api

    calls = []

    def gpu_gla(impl, q, k, v, g, **kw):
        calls.append(impl)
        return gla(q, k, v, g, backend="gpu", interpret=gpu_common.interpret_params(), **kw)

    monkeypatch.setattr(api, "gla_uses_gpu_kernel", lambda *a: True)
    monkeypatch.setattr(api, "gla_kernel", gpu_gla)
    b, t, h, dk, dv = 1, 64, 1, 64, 64
    q, k, v, g, _ = _gla_inputs(22, b, t, h, dk, dv, jnp.float32)
    for strong in (False, True):
        gg = g.at[..., :4].set(-30.0) if strong else g
        o, s = jax.jit(lambda *a: ops_gla(*a, impl="auto"))(q, k, v, gg)
        chex.assert_shape((o, s), ((b, t, h, dv), (b, h, dk, dv)))
        ro, rs = gla_reference(q, k, v, gg)
        tol = 1e-5 if strong else GLA_TOL[jnp.float32]  # strong: the exact float32 XLA path ran
        np.testing.assert_allclose(np.asarray(o, np.float64), ro, atol=tol * np.abs(ro).max(), rtol=tol)
        np.testing.assert_allclose(np.asarray(s, np.float64), rs, atol=tol * np.abs(rs).max(), rtol=tol)
        assert bool(gla_gpu_gates_ok(gg)) is not strong
    assert calls == ["auto"] * 2  # traced in both conds; with strong gates the kernel branch was not the one run
    o_kernel, _ = gla(q, k, v, g.at[..., :4].set(-30.0), backend="gpu", interpret=gpu_common.interpret_params())
    assert not np.all(np.isfinite(np.asarray(o_kernel)))  # the overflow the guard avoids
