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
from pallas_kernels.linear_scan.reference import chunk_step, chunk_step_bwd


def _kernel(*refs, scale, sub_chunk, scalar, has_s0, n_chunks, states_only=False):
    it = iter(refs)
    q_ref, k_ref, v_ref, b_ref = next(it), next(it), next(it), next(it)
    brow_ref = next(it) if scalar else None
    s0_ref = next(it) if has_s0 else None
    o_ref, sf_ref, st_ref = next(it), next(it), next(it)
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        st_ref[...] = s0_ref[...].astype(jnp.float32) if has_s0 else jnp.zeros(st_ref.shape, jnp.float32)

    if states_only:  # backward's recomputation pass: the state entering each chunk, no outputs
        st = st_ref[...]
        o_ref[...] = st
        b = b_ref[...]
        b_last = b[b.shape[0] - 1:]
        kd = k_ref[...].astype(jnp.float32) * jnp.exp(b_last - b)
        st_new = st * jnp.exp(b_last) + jax.lax.dot_general(
            v_ref[...].astype(jnp.float32), kd, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        parts, st_new = chunk_step(st_ref[...], q_ref[...], k_ref[...], v_ref[...], b_ref[...],
                                   brow_ref[...] if scalar else None, scale=scale, sub_chunk=sub_chunk)
        rows = parts[0].shape[0]
        for i, part in enumerate(parts):
            o_ref[pl.ds(i * rows, rows), :] = part.astype(o_ref.dtype)
    st_ref[...] = st_new

    @pl.when(c == n_chunks - 1)
    def _():
        sf_ref[...] = st_new


def scan_call(q, k, v, b, brow, st0, *, scale, chunk, sub_chunk, out_dtype, interpret, params=None,
              states_only=False):
    """q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; b: chunk-local cumulative log-gates [B, H, T, Dk or 1] float32;
    brow: [B, H, T // chunk, 1, chunk] (scalar gates) or None; st0: [B, H, Dv, Dk] or None.
    Returns (o [B, H, T, Dv] out_dtype, S^T [B, H, Dv, Dk] float32), or with ``states_only`` (the backward's
    recomputation) (states entering each chunk [B, H, T // chunk, Dv, Dk] float32, S^T)."""
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
                               has_s0=st0 is not None, n_chunks=n, states_only=states_only)
    if states_only:
        first = (jax.ShapeDtypeStruct((bsz, heads, n, dv, dk), jnp.float32),
                 pl.BlockSpec((None, None, None, dv, dk), lambda b_, h, c: (b_, h, c, 0, 0)))
    else:
        first = (jax.ShapeDtypeStruct((bsz, heads, t_len, dv), out_dtype), row(dv))
    return pl.pallas_call(
        kernel,
        out_shape=(first[0], jax.ShapeDtypeStruct((bsz, heads, dv, dk), jnp.float32)),
        grid=(bsz, heads, n),
        in_specs=in_specs,
        out_specs=(first[1], state),
        scratch_shapes=[(pltpu.VMEM if params is None else plgpu.SMEM)((dv, dk), jnp.float32)],
        compiler_params=params if params is not None else tpu_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="gated_linear_scan",
    )(*args)


def _bwd_kernel(*refs, scale, sub_chunk, scalar, n_chunks):
    it = iter(refs)
    q_ref, k_ref, v_ref, b_ref = next(it), next(it), next(it), next(it)
    brow_ref = next(it) if scalar else None
    do_ref, st_ref, dsf_ref = next(it), next(it), next(it)
    dq_ref, dk_ref, dv_ref, db_ref, ds0_ref, dst_ref = (next(it) for _ in range(6))
    c = pl.program_id(2)

    @pl.when(c == 0)  # first step = last chunk
    def _():
        dst_ref[...] = dsf_ref[...].astype(jnp.float32)

    dq, dk, dv, db, dst_in = chunk_step_bwd(
        st_ref[...], dst_ref[...], q_ref[...], k_ref[...], v_ref[...], b_ref[...], do_ref[...],
        brow_ref[...] if scalar else None, scale=scale, sub_chunk=sub_chunk, scalar=scalar)
    dq_ref[...] = dq
    dk_ref[...] = dk
    dv_ref[...] = dv
    db_ref[...] = db
    dst_ref[...] = dst_in

    @pl.when(c == n_chunks - 1)
    def _():
        ds0_ref[...] = dst_in


def scan_bwd_call(q, k, v, b, brow, do, states, dsf, *, scale, chunk, sub_chunk, interpret, params=None):
    """Reverse-time backward kernel: the chunk axis runs from the last chunk to the first with the state gradient
    ``dS^T [Dv, Dk]`` in a float32 VMEM scratch.

    Args: as ``scan_call``; do: [B, H, T, Dv]; states: [B, H, T // chunk, Dv, Dk] entering states (from the
      ``states_only`` pass); dsf: [B, H, Dv, Dk] gradient of the final state.
    Returns: float32 (dq, dk [B, H, T, Dk], dv [B, H, T, Dv], db [B, H, T, Dk or 1] (cumulative-gate gradient),
      dS0^T [B, H, Dv, Dk]).
    """
    bsz, heads, t_len, dk = q.shape
    dv = v.shape[-1]
    n = t_len // chunk
    rev = lambda width: pl.BlockSpec((None, None, chunk, width), lambda b_, h, c: (b_, h, n - 1 - c, 0))
    state = pl.BlockSpec((None, None, dv, dk), lambda b_, h, c: (b_, h, 0, 0))
    in_specs = [rev(dk), rev(dk), rev(dv), rev(b.shape[-1])]
    args = [q, k, v, b]
    if brow is not None:
        in_specs.append(pl.BlockSpec((None, None, None, 1, chunk), lambda b_, h, c: (b_, h, n - 1 - c, 0, 0)))
        args.append(brow)
    in_specs += [rev(dv), pl.BlockSpec((None, None, None, dv, dk), lambda b_, h, c: (b_, h, n - 1 - c, 0, 0)),
                 state]
    args += [do, states, dsf]
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    kernel = functools.partial(_bwd_kernel, scale=scale, sub_chunk=sub_chunk, scalar=brow is not None, n_chunks=n)
    return pl.pallas_call(
        kernel,
        out_shape=(f32(bsz, heads, t_len, dk), f32(bsz, heads, t_len, dk), f32(bsz, heads, t_len, dv),
                   f32(bsz, heads, t_len, b.shape[-1]), f32(bsz, heads, dv, dk)),
        grid=(bsz, heads, n),
        in_specs=in_specs,
        out_specs=(rev(dk), rev(dk), rev(dv), rev(b.shape[-1]), state),
        scratch_shapes=[(pltpu.VMEM if params is None else plgpu.SMEM)((dv, dk), jnp.float32)],
        compiler_params=params if params is not None else tpu_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="gated_linear_scan_bwd",
    )(*args)
