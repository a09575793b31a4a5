"""The Mosaic GPU (wgmma) scalar-gate scan kernel, run by the Mosaic GPU interpreter on CPU (``InterpretGPUParams``:
it simulates shared memory, TMA copies, barriers and wgmma, but not register layouts, swizzling or timing), against
float64 token loops. Lowering for the real target is in ``test_export.py``. No GPU was available: these values
are the interpreter's, not the device's."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

from pallas_kernels.common import BlockSizes
from pallas_kernels.linear_scan import gla, gpu, ssd, ssd_reference

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


def test_gpu_kernel_limits_raise_clearly():
    x, dt, a, bm, cm, d, _ = _inputs(0, 1, 8, 2, 16, 1, 16, jnp.float32)
    with pytest.raises(NotImplementedError, match="multiple of 64"):
        ssd(x, dt, a, bm, cm, d, backend="gpu", interpret=gpu.interpret_params())
    q = jnp.zeros((1, 64, 1, 64))
    with pytest.raises(NotImplementedError, match="vector \\(GLA\\) gates"):
        gla(q, q, q, q, backend="gpu")
