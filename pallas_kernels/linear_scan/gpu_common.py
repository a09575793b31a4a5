"""Building blocks of the Mosaic GPU (Hopper, wgmma) scan kernels: shared-memory tiles and their byte count, wgmma
helpers, register-layout helpers, and the double-buffered TMA pipeline of the chunk operands."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SMEM_LIMIT = 232_448  # bytes of shared memory one block may opt in to on sm_90 (H100 / H200)
_ALIGN = 1024  # Mosaic GPU rounds every shared-memory scratch buffer up to 1 KiB
_BARRIER = 8  # bytes per mbarrier

WG = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # a vector indexed by the row of a WGMMA-layout [M, N] array
COL = plgpu.Layout.WGMMA.reduce(0)  # a vector indexed by the column


def interpret_params():
    """The Mosaic GPU interpreter (jax 0.10.2 keeps it under ``jax._src``; not re-exported by ``plgpu``)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def is_gpu_interpret(interpret) -> bool:
    """Whether ``interpret`` asks for the Mosaic GPU interpreter (runs the wgmma kernels on CPU)."""
    if interpret is None or isinstance(interpret, bool):
        return False
    try:  # a private module in jax 0.10.2: absent elsewhere means "not the GPU interpreter"
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:  # pragma: no cover - depends on the jax version
        return False
    return isinstance(interpret, InterpretGPUParams)


def scratch_bytes(*buffers):
    """Shared memory of scratch buffers ``(shape, dtype)`` / barrier counts (int) as Mosaic GPU allocates them."""
    total = 0
    for b in buffers:
        if isinstance(b, int):
            total += _BARRIER * b
        else:
            shape, dtype = b
            size = jnp.dtype(dtype).itemsize
            for s in shape:
                size *= s
            total += -(-size // _ALIGN) * _ALIGN
    return total


def smem_tile(shape, dtype):
    """A 2-D shared-memory tile laid out for TMA and wgmma: 128-byte swizzle, tiles of (8, 128 bytes)."""
    minor = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, minor)), plgpu.SwizzleTransform(128)))


def mm(a_ref, b_ref, shape):
    """``a @ b`` of two shared-memory refs by wgmma into a fresh float32 accumulator; returns the value."""

    def body(acc):
        plgpu.wgmma(acc, a_ref, b_ref)
        return acc[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def mm_acc(acc0, a_ref, b_ref, interpret=None):
    """``acc0 + a @ b``: wgmma into an accumulator initialised with the register value ``acc0`` (no second tile).
    The Mosaic GPU interpreter of jax 0.10.2 has no rule for ``run_state``: there it adds a fresh product (same
    value; the interpreter does not model registers)."""
    if interpret is not None:
        return acc0 + mm(a_ref, b_ref, acc0.shape)

    def body(acc):
        plgpu.wgmma(acc, a_ref, b_ref)

    return pl.run_state(body)(plgpu.ACC.init(acc0))


def scale_sub(x, idx, dim, vecs, ell):
    """``x`` with the elements of sub-chunk i (of ``ell`` tokens) times ``vecs[i]()``, zero where ``vecs[i]`` is
    None. ``idx``: the 1-D token index of ``x``'s axis ``dim``; the masks are formed on it and broadcast (no
    [C, Dk] index tile in registers), and one factor is applied at a time (one factor vector live, not all)."""
    sub_id = lax.div(idx, ell)
    bc = lambda m: lax.broadcast_in_dim(m, x.shape, [dim])
    if any(f is None for f in vecs):
        keep = functools.reduce(jnp.logical_or, [sub_id == i for i, f in enumerate(vecs) if f is not None])
        x = jnp.where(bc(keep), x, 0.0)
    for i, f in enumerate(vecs):
        if f is not None:
            x = jnp.where(bc(sub_id == i), x * f(), x)
    return x


def mm2(a_ref, b_ref, c_ref, d_ref, shape):
    """``a @ b + c @ d``: two wgmma into one fresh float32 accumulator."""

    def body(acc):
        plgpu.wgmma(acc, a_ref, b_ref)
        plgpu.wgmma(acc, c_ref, d_ref)
        return acc[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def layout_helpers(interpret):
    """``lc`` (layout_cast) and ``iota(shape, dim)``: the interpreter of jax 0.10.2 has no rule for layout casts or
    layout-annotated iotas, so interpret mode leaves the annotations (identity semantics) out (see ``ssd_scan_fwd``)."""
    lc = (lambda x, layout: x) if interpret is not None else plgpu.layout_cast
    iota = (
        (lambda shape, d: lax.broadcasted_iota(jnp.int32, shape, d))
        if interpret is not None
        else (lambda shape, d: plgpu.broadcasted_iota(jnp.int32, shape, d, layout=WG))
    )
    return lc, iota


def load_all(copies, bars):
    """TMA-copies every ``(gmem_src, smem_dst)`` pair (one barrier each) and waits for all of them."""
    for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
    for i in range(len(copies)):
        plgpu.barrier_wait(bars.at[i])


def store_tile(val, o_s, dst):
    """Registers -> the shared-memory output tile -> TMA store to ``dst``, waited for (``o_s`` is reused)."""
    o_s[...] = val.astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, dst)
    plgpu.wait_smem_to_gmem(0)


def double_buffered(bufs, bars, sources, n: int):
    """The TMA pipeline of a kernel that walks ``n`` chunks: chunk ``i + 1``'s operands are copied into one half of
    the double buffers while chunk ``i`` is computed from the other.

    Args:
      bufs: shared-memory refs ``[2, ...]``, one per operand.
      bars: ``2 * len(bufs) + 1`` barriers (``Barrier(num_barriers=pipeline_barriers(len(bufs)))``): one per operand
        and buffer half, and one for the carried state's initial copy.
      sources: ``sources(i)`` -> the global-memory refs of chunk step ``i``'s operands, in the order of ``bufs``.
      n: number of chunk steps.
    Returns:
      ``(start, acquire)``. ``start(src, dst)`` copies the carried state ``src -> dst`` and chunk 0's operands, and
      waits for the state. ``acquire(i)`` (inside the chunk loop) starts the copies of step ``i + 1`` into the other
      half (last read by step ``i - 1``, whose matmuls are finished), waits for step ``i``'s operands and returns
      their views.
    """
    n_in = len(bufs)

    def issue(i, slot):
        for j, (src, dst) in enumerate(zip(sources(i), bufs)):
            plgpu.copy_gmem_to_smem(src, dst.at[slot], bars.at[slot * n_in + j])

    def start(src, dst):
        plgpu.copy_gmem_to_smem(src, dst, bars.at[2 * n_in])
        issue(0, 0)
        plgpu.barrier_wait(bars.at[2 * n_in])

    def acquire(i):
        slot = lax.rem(i, 2)

        @pl.when(i + 1 < n)
        def _prefetch():
            issue(i + 1, 1 - slot)

        for j in range(n_in):
            plgpu.barrier_wait(bars.at[slot * n_in + j])
        return tuple(b.at[slot] for b in bufs)

    return start, acquire


def pipeline_barriers(n_in: int) -> int:
    """Barriers of a :func:`double_buffered` pipeline of ``n_in`` operands."""
    return 2 * n_in + 1
