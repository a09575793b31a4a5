"""The ``impl=`` switch of the scan ops (``pallas_kernels.linear_scan.api``) routing to the kernels."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import accelerator_backend
from pallas_kernels.linear_scan import api, gla_reference


def test_linear_scan_routes_and_falls_back():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 6, 1, 8)), jnp.float32) for _ in range(3))
    g = jnp.asarray(np.log(rng.uniform(0.7, 1.0, (1, 6, 1, 8))), jnp.float32)
    assert api.scan_kernel("xla", "gla", q, k, v, g) is None
    if accelerator_backend() is None:
        assert api.scan_kernel("auto", "gla", q, k, v, g) is None
        with pytest.raises(NotImplementedError, match="pallas_interpret"):
            api.scan_kernel("pallas", "gla", q, k, v, g)
    o, s = jax.jit(lambda *a: api.scan_kernel("pallas_interpret", "gla", *a, chunk_size=16))(q, k, v, g)
    ro, rs = gla_reference(q, k, v, g)
    np.testing.assert_allclose(np.asarray(o), ro, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s), rs, atol=1e-5)
    y, h = jax.jit(lambda *a: api.ssd_kernel("pallas_interpret", *a, chunk_size=8))(
        v, jnp.full((1, 6, 1), 0.1), jnp.array([-1.0]), k, q, jnp.array([0.5])
    )
    chex.assert_shape((y, h), ((1, 6, 1, 8), (1, 1, 8, 8)))
    with pytest.raises(ValueError, match="unknown op"):
        api.scan_kernel("auto", "gdn", q, k, v, g)
    with pytest.raises(ValueError, match="unknown impl"):
        api.scan_kernel("fast", "gla", q, k, v, g)


def test_scan_supports_reports_the_gpu_kernel_limits():
    from pallas_kernels.linear_scan import supports

    ok = dict(dk=128, dv=256, t_len=4096, chunk_size=64)
    assert supports("gla", backend="gpu", **ok) and supports("ssd", backend="gpu", **ok)
    assert supports("gla", backend="tpu", dk=8, dv=8, t_len=5, chunk_size=3)  # the TPU kernel takes any shape
    assert not supports("gla", backend="gpu", **{**ok, "dk": 96})  # Dk not a multiple of 64
    assert not supports("ssd", backend="gpu", **{**ok, "dv": 96})  # Dv not a multiple of block_dv = 64
    assert not supports("gla", backend="gpu", **{**ok, "chunk_size": 32})  # chunk not a multiple of 64
    assert supports("gla", backend="gpu", **{**ok, "t_len": 5, "chunk_size": 32}) is False
    if accelerator_backend() is None:
        assert not supports("gla", **ok)  # no compiled kernel on a CPU host
    with pytest.raises(ValueError, match="unknown op"):
        supports("gdn", **ok)


def test_ssd_gpu_chunk_plan_holds_the_smem_model_to_the_limit():
    """The SSD kernels' chunk is the largest multiple of 64 up to the requested one whose kernels all fit an sm_90
    block's 232,448 bytes (the per-kernel models are checked against Mosaic's own counts in test_export.py)."""
    from pallas_kernels.common import BlockSizes
    from pallas_kernels.linear_scan import gpu_common, gpu_plan, supports

    limit = 232448
    assert gpu_common.SMEM_LIMIT == limit
    # Mamba2's chunk of 256 at N = 128: 691,288 bytes (dq/dk kernel); 192 and 128 are over too; 64 fits
    assert gpu_plan.ssd_smem_bytes(256, 128, 64) == 691288
    assert (
        min(gpu_plan.ssd_smem_bytes(c, 128, 64) for c in (128, 192, 256))
        > limit
        >= gpu_plan.ssd_smem_bytes(64, 128, 64)
    )
    assert gpu_plan.ssd_chunk(256, 128, 64) == 64
    assert gpu_plan.ssd_chunk(256, 64, 64) == 128  # N = 64: 216,152 bytes at 128
    assert gpu_plan.ssd_chunk(64, 128, 64) == 64 and gpu_plan.ssd_chunk(256, 128, 64, fixed=False, limit=10**6) == 256
    with pytest.raises(NotImplementedError, match="need 283768 bytes of shared memory at chunk=64.* may use 232448"):
        gpu_plan.ssd_chunk(256, 256, 64)  # N = 256 fits at no chunk
    with pytest.raises(NotImplementedError, match="need 691288 bytes .* at chunk=256"):
        gpu_plan.ssd_chunk(256, 128, 64, fixed=True)
    big = dict(dk=128, dv=256, t_len=16384, chunk_size=256)
    assert supports("ssd", backend="gpu", **big)  # planned down to 64
    assert not supports("ssd", backend="gpu", **{**big, "dk": 256})
    assert not supports("ssd", backend="gpu", block_sizes=BlockSizes(chunk=256), **big)
    assert supports("ssd", backend="gpu", block_sizes=BlockSizes(chunk=64), **big)


def test_auto_routes_the_scan_to_the_gpu_kernel_only_for_supported_shapes(monkeypatch):
    """``impl="auto"`` on a (simulated) GPU host: the Mosaic GPU kernel for shapes it takes, XLA (None) otherwise.
    The kernel entry point is replaced by a recorder: this checks the routing, not the kernel."""
    import pallas_kernels.common as common
    from pallas_kernels.linear_scan import kernel as ls

    monkeypatch.setattr(api, "accelerator_backend", lambda: "gpu")
    monkeypatch.setattr(common.jax, "default_backend", lambda: "gpu")
    calls = []
    monkeypatch.setattr(ls, "gla", lambda *a, **kw: calls.append(("gla", kw)) or "kernel")
    monkeypatch.setattr(ls, "ssd", lambda *a, **kw: calls.append(("ssd", kw)) or "kernel")
    q = jnp.zeros((1, 128, 2, 64))
    v = jnp.zeros((1, 128, 2, 128))
    assert api.gla_kernel("auto", q, q, v, q, chunk_size=64) == "kernel"
    assert api.gla_kernel("auto", q, q, v, q, chunk_size=16) is None  # chunk 16: XLA
    assert api.gla_kernel("auto", q[..., :32], q[..., :32], v, q[..., :32], chunk_size=64) is None  # Dk 32: XLA
    x, dt, a, d = jnp.zeros((1, 128, 2, 64)), jnp.zeros((1, 128, 2)), jnp.zeros((2,)), jnp.zeros((2,))
    bm = jnp.zeros((1, 128, 1, 64))
    assert api.ssd_kernel("auto", x, dt, a, bm, bm, d, chunk_size=256) == "kernel"
    assert api.ssd_kernel("auto", x[..., :48], dt, a, bm, bm, d, chunk_size=256) is None  # P = 48: XLA
    assert [c[0] for c in calls] == ["gla", "ssd"] and all(c[1]["interpret"] is False for c in calls)
