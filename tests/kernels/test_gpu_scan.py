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

from pallas_kernels.common import BlockSizes
from canon_jax.ops import gla as ops_gla
from pallas_kernels.linear_scan import gla, gla_reference, gpu, ssd, ssd_reference

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
    y, hf = ssd(x, dt, a, bm, cm, d, initial_state=h0, chunk_size=chunk, block_sizes=bs, backend="gpu",
                interpret=params)
    assert not get_races().races_found
    chex.assert_shape(y, (b, t, h, p))
    chex.assert_shape(hf, (b, h, p, n))
    assert y.dtype == dtype and hf.dtype == jnp.float32
    ry, rh = ssd_reference(*(np.asarray(z.astype(jnp.float32)) for z in (x, dt, a, bm, cm, d)),
                           initial_state=None if h0 is None else np.asarray(h0))
    np.testing.assert_allclose(np.asarray(y, np.float64), ry, atol=TOL * np.abs(ry).max(), rtol=TOL)
    np.testing.assert_allclose(np.asarray(hf, np.float64), rh, atol=TOL * np.abs(rh).max(), rtol=TOL)


def test_gpu_scan_backward_rule():
    """The GPU op's custom-VJP backward (``jax.vjp`` of the XLA chunked path, called here directly on residuals, so
    no kernel runs) against autodiff of a token-by-token scan. Two heads share one q/k group; three chunks (the XLA
    backward takes any chunk, so the sizes are small)."""
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
    got = jax.jit(lambda *a: gpu._scalar_scan_bwd(chunk, 64, None, a, (do, dsf)))(*args)
    for name, ga, gr in zip(("dq", "dk", "dv", "dg", "ds0"), got, want):
        chex.assert_shape(ga, gr.shape)
        np.testing.assert_allclose(np.asarray(ga), np.asarray(gr), atol=1e-4 * max(1.0, float(jnp.abs(gr).max())),
                                   rtol=1e-4, err_msg=name)


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
    o, sf = gla(q, k, v, g, initial_state=s0, chunk_size=chunk, block_sizes=BlockSizes(block_dv=bdv, sub_chunk=sub),
                backend="gpu", interpret=params)
    assert not get_races().races_found
    chex.assert_shape(o, (b, t, h, dv))
    chex.assert_shape(sf, (b, h, dk, dv))
    assert o.dtype == dtype and sf.dtype == jnp.float32
    ro, rs = gla_reference(*(np.asarray(z.astype(jnp.float32)) for z in (q, k, v, g)),
                           initial_state=None if s0 is None else np.asarray(s0))
    tol = GLA_TOL[dtype]
    np.testing.assert_allclose(np.asarray(o, np.float64), ro, atol=tol * np.abs(ro).max(), rtol=tol)
    np.testing.assert_allclose(np.asarray(sf, np.float64), rs, atol=tol * np.abs(rs).max(), rtol=tol)


def test_gla_gpu_backward_path_values():
    """``gpu._vector_scan_xla`` (the float32 XLA form whose ``jax.vjp`` is the GPU op's backward) against the float64
    loop: 3 chunks, 4 sub-chunks of 16, two heads, an initial state, gates down to -5 per token."""
    b, t, h, dk, dv = 2, 192, 2, 64, 32
    q, k, v, g, s0 = _gla_inputs(4, b, t, h, dk, dv, jnp.float32)
    o, sf = jax.jit(lambda *a: gpu._vector_scan_xla(*a, 0.125, 64, 16))(q, k, v, g, s0)
    chex.assert_shape(o, (b, t, h, dv))
    chex.assert_shape(sf, (b, h, dk, dv))
    ro, rs = gla_reference(q, k, v, g, scale=0.125, initial_state=s0)
    np.testing.assert_allclose(np.asarray(o, np.float64), ro, atol=1e-5 * np.abs(ro).max(), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(sf, np.float64), rs, atol=1e-5 * np.abs(rs).max(), rtol=1e-4)


def test_gla_gpu_grad_matches_xla():
    """``jax.grad`` through the public ``gla(backend="gpu")`` (forward: the kernel in the interpreter; backward:
    ``jax.vjp`` of ``gpu._vector_scan_xla`` on the saved inputs) against autodiff of
    ``canon_jax.ops.gla(impl="xla")``, a separately written chunked implementation. Loss weights both outputs (o and
    the final state)."""
    b, t, h, dk, dv = 1, 130, 1, 64, 64
    q, k, v, g, s0 = _gla_inputs(2, b, t, h, dk, dv, jnp.float32)
    rng = np.random.default_rng(5)
    wo = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)

    def loss(fn):
        def f(q, k, v, g, s0):
            o, sf = fn(q, k, v, g, s0)
            return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(sf * ws)
        return jax.grad(f, argnums=tuple(range(5)))

    got = jax.jit(loss(lambda *a: gla(*a[:4], initial_state=a[4], chunk_size=64, backend="gpu",
                                      interpret=gpu.interpret_params())))(q, k, v, g, s0)
    want = jax.jit(loss(lambda *a: ops_gla(*a[:4], initial_state=a[4], chunk_size=64, impl="xla")))(q, k, v, g, s0)
    for name, ga, gr in zip(("dq", "dk", "dv", "dg", "ds0"), got, want):
        chex.assert_shape(ga, gr.shape)
        np.testing.assert_allclose(np.asarray(ga), np.asarray(gr), atol=1e-4 * max(1.0, float(jnp.abs(gr).max())),
                                   rtol=1e-4, err_msg=name)


def test_gpu_kernel_limits_raise_clearly():
    x, dt, a, bm, cm, d, _ = _inputs(0, 1, 8, 2, 16, 1, 16, jnp.float32)
    with pytest.raises(NotImplementedError, match="multiple of 64"):
        ssd(x, dt, a, bm, cm, d, backend="gpu", interpret=gpu.interpret_params())
    q = jnp.zeros((1, 64, 1, 16))
    with pytest.raises(NotImplementedError, match="Dk .* must be a multiple of 64"):
        gla(q, q, q, q, backend="gpu", interpret=gpu.interpret_params())
    q = jnp.zeros((1, 64, 1, 64))
    with pytest.raises(NotImplementedError, match="multiple of block_dv"):
        gla(q, q, jnp.zeros((1, 64, 1, 96)), q, backend="gpu", interpret=gpu.interpret_params())
