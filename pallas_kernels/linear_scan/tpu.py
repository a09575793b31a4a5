"""Mosaic TPU kernel of the chunked gated linear-attention scan.

Grid ``(batch, heads, chunks)``; the chunk axis is "arbitrary" (sequential) and the transposed state
``S^T [Dv, Dk]`` stays in a float32 VMEM scratch across it. Per chunk the kernel runs ``reference.chunk_step``
(inter-chunk term and state update as matmuls, intra-chunk term as matmuls between sub-chunks plus a masked
diagonal part). Inputs arrive head-major ``[B, H, T, D]`` so a chunk is one ``[C, D]`` tile.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import tpu_params
from pallas_kernels.linear_scan.reference import chunk_step


def _kernel(*refs, scale, sub_chunk, scalar, has_s0, n_chunks):
    it = iter(refs)
    q_ref, k_ref, v_ref, b_ref = next(it), next(it), next(it), next(it)
    brow_ref = next(it) if scalar else None
    s0_ref = next(it) if has_s0 else None
    o_ref, sf_ref, st_ref = next(it), next(it), next(it)
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        st_ref[...] = s0_ref[...].astype(jnp.float32) if has_s0 else jnp.zeros(st_ref.shape, jnp.float32)

    parts, st_new = chunk_step(st_ref[...], q_ref[...], k_ref[...], v_ref[...], b_ref[...],
                               brow_ref[...] if scalar else None, scale=scale, sub_chunk=sub_chunk)
    rows = parts[0].shape[0]
    for i, part in enumerate(parts):
        o_ref[pl.ds(i * rows, rows), :] = part.astype(o_ref.dtype)
    st_ref[...] = st_new

    @pl.when(c == n_chunks - 1)
    def _():
        sf_ref[...] = st_new


def scan_call(q, k, v, b, brow, st0, *, scale, chunk, sub_chunk, out_dtype, interpret, params=None):
    """q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; b: chunk-local cumulative log-gates [B, H, T, Dk or 1] float32;
    brow: [B, H, T // chunk, 1, chunk] (scalar gates) or None; st0: [B, H, Dv, Dk] or None.
    Returns (o [B, H, T, Dv] out_dtype, S^T [B, H, Dv, Dk] float32)."""
    bsz, heads, t_len, dk = q.shape
    dv = v.shape[-1]
    n = t_len // chunk
    row = lambda width: pl.BlockSpec((None, None, chunk, width), lambda b_, h, c: (b_, h, c, 0))
    state = pl.BlockSpec((None, None, dv, dk), lambda b_, h, c: (b_, h, 0, 0))
    in_specs = [row(dk), row(dk), row(dv), row(b.shape[-1])]
    args = [q, k, v, b]
    if brow is not None:
        in_specs.append(pl.BlockSpec((None, None, None, 1, chunk), lambda b_, h, c: (b_, h, c, 0, 0)))
        args.append(brow)
    if st0 is not None:
        in_specs.append(state)
        args.append(st0)
    kernel = functools.partial(_kernel, scale=scale, sub_chunk=sub_chunk, scalar=brow is not None,
                               has_s0=st0 is not None, n_chunks=n)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((bsz, heads, t_len, dv), out_dtype),
                   jax.ShapeDtypeStruct((bsz, heads, dv, dk), jnp.float32)),
        grid=(bsz, heads, n),
        in_specs=in_specs,
        out_specs=(row(dv), state),
        scratch_shapes=[(pltpu.VMEM if params is None else plgpu.SMEM)((dv, dk), jnp.float32)],
        compiler_params=params if params is not None else tpu_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="gated_linear_scan",
    )(*args)
