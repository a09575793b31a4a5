"""Lowering of every kernel for the real targets at the paper's shapes: ``jax.export`` runs the Pallas -> Mosaic TPU
and Pallas -> Mosaic GPU lowering on this CPU machine (no execution; the final libtpu / ptxas compilation is not
covered). Forward and backward of each kernel."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.common import BlockSizes
from pallas_kernels.linear_scan import gla, ssd
from pallas_kernels.short_conv import short_conv

S = jax.ShapeDtypeStruct
PLATFORM = {"tpu": "tpu", "gpu": "cuda"}


def _export(fn, args, backend, kernels=()):
    """Exports ``fn`` for ``backend``; ``kernels``: names of pallas_calls that must be in the lowered program."""
    exp = jax.export.export(jax.jit(fn), platforms=[PLATFORM[backend]])(*args)
    text = exp.mlir_module()
    marker = "tpu_custom_call" if backend == "tpu" else "mosaic_gpu"
    assert marker in text, "no Pallas kernel lowered"
    for name in kernels:
        assert name in text, f"kernel {name} missing from the lowered program"


def _grad(fn, n):
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=tuple(range(n)))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("width", [2048, 16384])
def test_short_conv_lowers(backend, width):
    args = (S((1, 4096, width), jnp.bfloat16), S((4, width), jnp.float32), S((width,), jnp.float32))
    fn = lambda x, w, b: short_conv(x, w, bias=b, activation="silu", residual=True, backend=backend)
    _export(fn, args, backend)
    _export(_grad(fn, 3), args, backend)


@pytest.mark.parametrize(
    "backend,width,dtype",
    [
        ("tpu", 2048, jnp.bfloat16),
        ("gpu", 2048, jnp.bfloat16),
        ("gpu", 16384, jnp.bfloat16),
        ("gpu", 2048, jnp.float32),
        ("gpu", 16384, jnp.float32),
    ],
)
def test_short_conv_segments_lower(backend, width, dtype):
    """Segment ids with the initial state, bias, SiLU and residual: the forward, and value_and_grad (the forward
    kernel, the recomputed pre-activation and the masked anti-causal dx kernel)."""
    args = (
        S((1, 4096, width), dtype),
        S((4, width), jnp.float32),
        S((width,), jnp.float32),
        S((1, 4096), jnp.int32),
        S((1, width, 4), dtype),
    )
    fn = lambda x, w, b, seg, st: short_conv(
        x, w, bias=b, activation="silu", residual=True, segment_ids=seg, initial_state=st, backend=backend
    )
    _export(fn, args, backend, kernels=("short_conv_causal",))
    vg = jax.value_and_grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2, 4))
    _export(vg, args, backend, kernels=("short_conv_causal", "short_conv_anticausal"))


GLA_ARGS = (
    S((1, 4096, 16, 128), jnp.bfloat16),
    S((1, 4096, 16, 128), jnp.bfloat16),
    S((1, 4096, 16, 256), jnp.bfloat16),
    S((1, 4096, 16, 128), jnp.float32),
)
SSD_ARGS = (
    S((1, 4096, 16, 256), jnp.bfloat16),
    S((1, 4096, 16), jnp.float32),
    S((16,), jnp.float32),
    S((1, 4096, 1, 128), jnp.bfloat16),
    S((1, 4096, 1, 128), jnp.bfloat16),
)


@pytest.mark.parametrize("layout", ["auto", "head_major"])  # auto = time-major at these widths
def test_scan_lowers_on_tpu(layout):
    bs = BlockSizes.default("tpu")
    bs = BlockSizes(block_t=bs.block_t, block_d=bs.block_d, sub_chunk=bs.sub_chunk, scan_layout=layout)
    fg = lambda q, k, v, g: gla(q, k, v, g, backend="tpu", block_sizes=bs)[0]
    _export(fg, GLA_ARGS, "tpu")
    _export(_grad(fg, 4), GLA_ARGS, "tpu")
    fs = lambda *a: ssd(*a, chunk_size=128, backend="tpu", block_sizes=bs)[0]
    _export(fs, SSD_ARGS, "tpu")
    _export(_grad(fs, 5), SSD_ARGS, "tpu")


GPU_BWD_KERNELS = ("scan_state_pass_fwd", "scan_state_pass_rev")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_ssd_lowers_on_gpu(dtype, batch):
    """The Mosaic GPU wgmma scalar-gate kernels at the paper's shape (H=16, P=256, N=128, one group, T=4096): the
    forward, and value_and_grad, which holds the forward kernel and the backward kernels (both state passes, dq/dk,
    dv; plain grad would drop the forward kernel, whose output it does not need)."""
    args = tuple(
        S((batch,) + a.shape[1:] if a.ndim > 1 else a.shape, dtype if a.dtype == jnp.bfloat16 else a.dtype)
        for a in SSD_ARGS
    )
    # batch 1 asks for Mamba2's chunk of 256, whose kernels would need 580,728+ bytes: the plan runs them at 64
    fs = lambda *a: ssd(*a, chunk_size=256 if batch == 1 else 64, backend="gpu")[0]
    _export(fs, args, "gpu", kernels=("ssd_scan_fwd_wgmma",))
    _export(
        jax.value_and_grad(lambda *a: jnp.sum(fs(*a).astype(jnp.float32)), argnums=tuple(range(5))),
        args,
        "gpu",
        kernels=("ssd_scan_fwd_wgmma",) + GPU_BWD_KERNELS + ("ssd_scan_bwd_dqk", "ssd_scan_bwd_dv"),
    )


@pytest.mark.parametrize("batch", [1, 2])
def test_gla_lowers_on_gpu(batch):
    """The Mosaic GPU wgmma vector-gate (GLA) kernels at the paper's shape (H=16, Dk=128, Dv=256, T=4096, chunk 64,
    bfloat16): the forward's scratch (199,680 bytes at block_dv=64) and the backward kernels' (``gpu_bwd``, at most
    165,960 bytes) must pass Mosaic GPU's 232,448-byte shared-memory check, which runs at lowering. value_and_grad
    holds the forward kernel and the backward kernels (plain grad would drop the forward kernel)."""
    args = tuple(S((batch,) + a.shape[1:], a.dtype) for a in GLA_ARGS)
    fg = lambda *a: gla(*a, chunk_size=64, backend="gpu")[0]
    _export(fg, args, "gpu", kernels=("gla_scan_fwd_wgmma",))
    _export(
        jax.value_and_grad(lambda *a: jnp.sum(fg(*a).astype(jnp.float32)), argnums=tuple(range(4))),
        args,
        "gpu",
        kernels=("gla_scan_fwd_wgmma",) + GPU_BWD_KERNELS + ("gla_scan_bwd_dqk", "gla_scan_bwd_dv"),
    )


def test_scan_gpu_bwd_smem_model_matches_mosaic(monkeypatch):
    """``gpu_bwd.*_smem_bytes`` equal what Mosaic GPU allocates for each backward kernel at C=64, Dk=128,
    block_dv=64 (the bound forced to 0 makes the lowering report its count; every buffer is rounded up to 1 KiB,
    barriers take 8 bytes), and every one is under the 232,448-byte limit."""
    import re

    import jax.experimental.mosaic.gpu.core as mosaic_core

    from pallas_kernels.linear_scan import gpu_bwd as gb
    from pallas_kernels.linear_scan import gpu_fwd

    bf, f32 = jnp.bfloat16, jnp.float32
    b, t, h, dk, dv, c, dvb, sub = 1, 128, 2, 128, 128, 64, 64, 16
    n, nf = t // c, gpu_fwd.gla_factor_rows(c // sub)[1]
    state = (S((b, h, n, dv, dk), bf), S((b, h, n, dv, dk), bf))
    vdo = (S((b, t, h, dv), bf), S((b, h, dv, t), bf), S((b, t, h, dv), bf), S((b, h, dv, t), bf))
    gates = (S((b, h, t), f32),) * 3
    cases = [
        (
            lambda *a: gb.state_pass(*a, chunk=c, block_dv=dvb, reverse=True),
            (S((b, h, dk, t), bf), S((b, t, h, dv), bf), S((b, h, n, dk), f32), S((b, h, dk, dv), f32)),
            gb.state_pass_smem_bytes(c, dk, dvb),
        ),
        (
            lambda *a: gb.ssd_grads_dqk(*a, chunk=c, block_dv=dvb, rep=2),
            (S((b, t, 1, dk), bf), S((b, t, 1, dk), bf)) + vdo + state + gates,
            gb.ssd_grads_dqk_smem_bytes(c, dk, dvb),
        ),
        (
            lambda *a: gb.ssd_grads_dv(*a, chunk=c, block_dv=dvb, rep=2),
            (S((b, t, 1, dk), bf), S((b, 1, dk, t), bf), S((b, t, h, dv), bf), S((b, h, n, dk, dv), bf)) + gates[:2],
            gb.ssd_grads_dv_smem_bytes(c, dk, dvb),
        ),
        (
            lambda *a: gb.gla_grads_dqk(*a, chunk=c, sub=sub, block_dv=dvb),
            (S((b, t, h, dk), bf), S((b, t, h, dk), bf)) + vdo + state + (S((b, h, n, nf, dk), f32),),
            gb.gla_grads_dqk_smem_bytes(c, sub, dk, dvb),
        ),
        (
            lambda *a: gb.gla_grads_dv(*a, chunk=c, sub=sub, block_dv=dvb),
            (
                S((b, t, h, dk), bf),
                S((b, h, dk, t), bf),
                S((b, t, h, dv), bf),
                S((b, h, n, dk, dv), bf),
                S((b, h, n, nf, dk), f32),
            ),
            gb.gla_grads_dv_smem_bytes(c, sub, dk, dvb),
        ),
    ]
    monkeypatch.setattr(mosaic_core, "_SMEM_SIZE_BOUND", 0)
    for fn, args, model in cases:
        with pytest.raises(ValueError, match="exceeds available shared memory") as err:
            jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
        assert int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1)) == model
        assert model < 232448


@pytest.mark.parametrize("chunk,out_dtype", [(64, jnp.bfloat16), (64, jnp.float32), (256, jnp.bfloat16)])
def test_ssd_fwd_smem_model_matches_mosaic(monkeypatch, chunk, out_dtype):
    """``gpu_fwd.ssd_fwd_smem_bytes`` (which ``gpu_plan.ssd_chunk`` plans with) equals what Mosaic GPU allocates for
    the SSD forward kernel at Dk = 128, block_dv = 64: 580,728 bytes at Mamba2's chunk of 256 (the count the sm_90
    compile of ``mamba2_canon_1b`` reported), under the limit at 64."""
    import re

    import jax.experimental.mosaic.gpu.core as mosaic_core

    from pallas_kernels.linear_scan import gpu_common, gpu_fwd

    bf, f32 = jnp.bfloat16, jnp.float32
    b, h, dk, dv, c = 1, 2, 128, 128, chunk
    t = 2 * c
    args = (
        S((b, t, 1, dk), bf),
        S((b, 1, dk, t), bf),
        S((b, t, h, dv), bf),
        S((b, h, t), f32),
        S((b, h, t), f32),
        S((b, h, t), f32),
        S((b, h, t // c, dk), f32),
        S((b, h, dk, dv), f32),
    )
    fn = lambda *a: gpu_fwd.ssd_scan_fwd(*a, chunk=c, block_dv=64, rep=2, out_dtype=out_dtype)
    model = gpu_fwd.ssd_fwd_smem_bytes(c, dk, 64, out_dtype)
    monkeypatch.setattr(mosaic_core, "_SMEM_SIZE_BOUND", 0)
    with pytest.raises(ValueError, match="exceeds available shared memory") as err:
        jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1)) == model
    assert (model == 580728) if c == 256 else (model <= gpu_common.SMEM_LIMIT)


def test_ssd_gpu_fixed_chunk_over_shared_memory_raises():
    """An explicit ``BlockSizes.chunk`` is not shrunk: at 256 (N = 128) the kernels cannot fit, and the op says so
    with the need and the limit before lowering anything."""
    fs = lambda *a: ssd(*a, backend="gpu", block_sizes=BlockSizes(chunk=256))[0]
    with pytest.raises(NotImplementedError, match="need 691288 bytes of shared memory at chunk=256.* may use 232448"):
        _export(fs, SSD_ARGS, "gpu")


def test_gla_gpu_block_dv_128_exceeds_shared_memory():
    """block_dv=128 would double the state/value tiles (273,408 bytes of scratch): the lowering rejects it, which is
    why the default is 64 (``gpu_fwd.gla_smem_bytes``)."""
    from pallas_kernels.linear_scan import gpu_fwd

    assert gpu_fwd.gla_smem_bytes(64, 16, 128, 64) <= 232448 < gpu_fwd.gla_smem_bytes(64, 16, 128, 128)
    fg = lambda *a: gla(*a, chunk_size=64, backend="gpu", block_sizes=BlockSizes(block_dv=128))[0]
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        _export(fg, GLA_ARGS, "gpu")


@pytest.mark.parametrize("k,dtype", [(5, jnp.float32), (8, jnp.bfloat16)])
def test_short_conv_segments_large_k_lowers_on_gpu(k, dtype):
    """K >= 5 with segment ids overflows 227 KiB of shared memory at the default 32-row tile (pre-broadcast weights
    and masks grow with K); the GPU wrapper shrinks the tile height until it fits."""
    args = (S((1, 4096, 2048), dtype), S((k, 2048), jnp.float32), S((1, 4096), jnp.int32))
    fn = lambda x, w, seg: short_conv(x, w, segment_ids=seg, activation="silu", residual=True, backend="gpu")
    _export(
        jax.value_and_grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1)),
        args,
        "gpu",
        kernels=("short_conv_causal", "short_conv_anticausal"),
    )


def test_short_conv_gpu_smem_model_matches_mosaic(monkeypatch):
    """``gpu.smem_bytes`` (used to pick the tile height) equals what Mosaic GPU allocates: with the shared-memory
    bound forced to 0, the lowering error reports the kernel's byte count."""
    import re

    import jax.experimental.mosaic.gpu.core as mosaic_core

    from pallas_kernels.short_conv import gpu

    monkeypatch.setattr(mosaic_core, "_SMEM_SIZE_BOUND", 0)
    for dtype, bd, k in [(jnp.bfloat16, 128, 4), (jnp.float32, 40, 3)]:
        hrows = 16 if dtype == jnp.bfloat16 else 8
        args = (
            S((1, 64, bd), dtype),
            S((k, bd), jnp.float32),
            S((1, hrows, bd), dtype),
            S((1, bd), jnp.float32),
            S((1, 64, 1), jnp.int32),
            S((1, 64, bd), dtype),
        )
        fn = lambda x, w, h0, b, bits, ex: gpu.conv_call(
            x,
            w,
            halo0=h0,
            bias=b,
            bits=bits,
            extra=ex,
            direction="causal",
            activation="silu",
            residual_x=True,
            out_dtype=dtype,
            bt=32,
            bd=bd,
            hrows=hrows,
            interpret=False,
        )
        with pytest.raises(ValueError, match="exceeds available shared memory") as err:
            jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
        reported = int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1))
        assert reported == gpu.smem_bytes(
            32,
            bd,
            hrows,
            k,
            x_dtype=dtype,
            out_dtype=dtype,
            has_halo0=True,
            has_bias=True,
            has_mask=True,
            extra_dtype=dtype,
        )


def test_short_conv_gpu_too_wide_tile_raises():
    args = (S((1, 256, 2048), jnp.float32), S((12, 2048), jnp.float32), S((1, 256), jnp.int32))
    fn = lambda x, w, seg: short_conv(x, w, segment_ids=seg, backend="gpu", block_sizes=BlockSizes(32, 512))
    with pytest.raises(ValueError, match="block_d=512 needs .* bytes of shared memory"):
        _export(fn, args, "gpu")
