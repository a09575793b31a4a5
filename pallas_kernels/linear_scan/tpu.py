"""Mosaic TPU kernel of the chunked gated linear-attention scan.

Grid ``(batch, heads, chunks)``; the chunk axis is "arbitrary" (sequential) and the transposed state
``S^T [Dv, Dk]`` stays in a float32 VMEM scratch across it. Per chunk the kernel runs ``reference.chunk_step``
(inter-chunk term and state update as matmuls, intra-chunk term as matmuls between sub-chunks plus a masked
diagonal part). Inputs arrive head-major ``[B, H, T, D]`` so a chunk is one ``[C, D]`` tile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import tpu_params
from pallas_kernels.cost import scan_cost
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
        b_last = b[b.shape[0] - 1 :]
        kd = k_ref[...].astype(jnp.float32) * jnp.exp(b_last - b)
        st_new = st * jnp.exp(b_last) + jax.lax.dot_general(
            v_ref[...].astype(jnp.float32), kd, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
    else:
        parts, st_new = chunk_step(
            st_ref[...],
            q_ref[...],
            k_ref[...],
            v_ref[...],
            b_ref[...],
            brow_ref[...] if scalar else None,
            scale=scale,
            sub_chunk=sub_chunk,
        )
        rows = parts[0].shape[0]
        for i, part in enumerate(parts):
            o_ref[pl.ds(i * rows, rows), :] = part.astype(o_ref.dtype)
    st_ref[...] = st_new

    @pl.when(c == n_chunks - 1)
    def _():
        sf_ref[...] = st_new


@dataclasses.dataclass(frozen=True)
class ScanLayout:
    """Operand layout of the scan kernels.

    ``kind="head"``: ``[B, H, T, D]`` (the wrapper transposes the callers' ``[B, T, H, D]``; one HBM pass per
    operand). ``kind="time"``: the callers' layout reshaped for free to ``[B, T, H*D]``; a chunk of one head is the
    block ``(chunk, D)`` at column block ``h`` (TPU needs ``D % 128 == 0``), and q/k of grouped heads (SSD's B/C)
    are read through ``h // rep`` without being repeated. Scalar gates are always head-major ``[B, H, T, 1]``.
    """

    kind: str
    heads: int
    dk: int
    dv: int
    rep: int = 1

    def spec(self, what, chunk, n, reverse=False):
        cidx = (lambda c: n - 1 - c) if reverse else (lambda c: c)
        width = {"qk": self.dk, "k_out": self.dk, "v": self.dv, "b": self.dk, "b1": 1}[what]
        if self.kind == "head" or what == "b1":
            return pl.BlockSpec((None, None, chunk, width), lambda b_, h, c: (b_, h, cidx(c), 0))
        # lax.div (truncating; h >= 0): ``//`` lowers through ``sign``, whose Mosaic rule needs a TPU to query.
        col = (lambda h: jax.lax.div(h, self.rep)) if what == "qk" and self.rep > 1 else (lambda h: h)
        return pl.BlockSpec((None, chunk, width), lambda b_, h, c: (b_, cidx(c), col(h)))

    def out_shape(self, what, bsz, t_len, dtype):
        width = {"k_out": self.dk, "v": self.dv, "b": self.dk, "b1": 1}[what]
        if self.kind == "head" or what == "b1":
            return jax.ShapeDtypeStruct((bsz, self.heads, t_len, width), dtype)
        return jax.ShapeDtypeStruct((bsz, t_len, self.heads * width), dtype)


def scan_call(
    q,
    k,
    v,
    b,
    brow,
    st0,
    *,
    layout: ScanLayout,
    scale,
    chunk,
    sub_chunk,
    out_dtype,
    interpret,
    states_only=False,
):
    """Forward scan kernel.

    Args:
      q, k, v: per ``layout`` (``[B, H, T, D]`` or ``[B, T, H*D]``; q/k may have H/rep groups in the time layout).
      b: chunk-local cumulative log-gates, float32: vector gates like k (per head), scalar gates ``[B, H, T, 1]``.
      brow: ``[B, H, T // chunk, 1, chunk]`` (scalar gates) or None. st0: ``[B, H, Dv, Dk]`` or None.
    Returns:
      ``(o, S^T [B, H, Dv, Dk] float32)`` with ``o`` like v in ``out_dtype``; with ``states_only`` (the backward's
      recomputation) ``(states entering each chunk [B, H, T // chunk, Dv, Dk] float32, S^T)``.
    """
    bsz, t_len = q.shape[0], (q.shape[2] if layout.kind == "head" else q.shape[1])
    heads, dk, dv = layout.heads, layout.dk, layout.dv
    n = t_len // chunk
    scalar = brow is not None
    state = pl.BlockSpec((None, None, dv, dk), lambda b_, h, c: (b_, h, 0, 0))
    in_specs = [
        layout.spec("qk", chunk, n),
        layout.spec("qk", chunk, n),
        layout.spec("v", chunk, n),
        layout.spec("b1" if scalar else "b", chunk, n),
    ]
    args = [q, k, v, b]
    if scalar:
        in_specs.append(pl.BlockSpec((None, None, None, 1, chunk), lambda b_, h, c: (b_, h, c, 0, 0)))
        args.append(brow)
    if st0 is not None:
        in_specs.append(state)
        args.append(st0)
    kernel = functools.partial(
        _kernel,
        scale=scale,
        sub_chunk=sub_chunk,
        scalar=scalar,
        has_s0=st0 is not None,
        n_chunks=n,
        states_only=states_only,
    )
    if states_only:
        first = (
            jax.ShapeDtypeStruct((bsz, heads, n, dv, dk), jnp.float32),
            pl.BlockSpec((None, None, None, dv, dk), lambda b_, h, c: (b_, h, c, 0, 0)),
        )
    else:
        first = (layout.out_shape("v", bsz, t_len, out_dtype), layout.spec("v", chunk, n))
    out_shape = (first[0], jax.ShapeDtypeStruct((bsz, heads, dv, dk), jnp.float32))
    # states_only reads no q (its block is still fetched: counted) and computes only the state update.
    cost = scan_cost(
        bsz,
        heads,
        n,
        chunk,
        dk,
        dv,
        scalar=scalar,
        sub=sub_chunk,
        operands=args,
        outputs=out_shape,
        rep=layout.rep if layout.kind == "time" else 1,
        states_only=states_only,
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        cost_estimate=cost,
        grid=(bsz, heads, n),
        in_specs=in_specs,
        out_specs=(first[1], state),
        scratch_shapes=[pltpu.VMEM((dv, dk), jnp.float32)],
        compiler_params=tpu_params(("parallel", "parallel", "arbitrary")),
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
        st_ref[...],
        dst_ref[...],
        q_ref[...],
        k_ref[...],
        v_ref[...],
        b_ref[...],
        do_ref[...],
        brow_ref[...] if scalar else None,
        scale=scale,
        sub_chunk=sub_chunk,
        scalar=scalar,
    )
    dq_ref[...] = dq
    dk_ref[...] = dk
    dv_ref[...] = dv
    db_ref[...] = db
    dst_ref[...] = dst_in

    @pl.when(c == n_chunks - 1)
    def _():
        ds0_ref[...] = dst_in


def scan_bwd_call(q, k, v, b, brow, do, states, dsf, *, layout: ScanLayout, scale, chunk, sub_chunk, interpret):
    """Reverse-time backward kernel: the chunk axis runs from the last chunk to the first with the state gradient
    ``dS^T [Dv, Dk]`` in a float32 VMEM scratch.

    Args: as ``scan_call``; do: like v; states: ``[B, H, T // chunk, Dv, Dk]`` entering states (from the
      ``states_only`` pass); dsf: ``[B, H, Dv, Dk]`` gradient of the final state.
    Returns: float32 ``(dq, dk, dv, db, dS0^T [B, H, Dv, Dk])``; dq/dk per head (like v but Dk wide: the caller
      sums grouped heads), db like b (the gradient with respect to the cumulative gates).
    """
    bsz, t_len = q.shape[0], (q.shape[2] if layout.kind == "head" else q.shape[1])
    heads, dk, dv = layout.heads, layout.dk, layout.dv
    n = t_len // chunk
    scalar = brow is not None
    bkind = "b1" if scalar else "b"
    spec = lambda what: layout.spec(what, chunk, n, reverse=True)
    state = pl.BlockSpec((None, None, dv, dk), lambda b_, h, c: (b_, h, 0, 0))
    in_specs = [spec("qk"), spec("qk"), spec("v"), spec(bkind)]
    args = [q, k, v, b]
    if scalar:
        in_specs.append(pl.BlockSpec((None, None, None, 1, chunk), lambda b_, h, c: (b_, h, n - 1 - c, 0, 0)))
        args.append(brow)
    in_specs += [spec("v"), pl.BlockSpec((None, None, None, dv, dk), lambda b_, h, c: (b_, h, n - 1 - c, 0, 0)), state]
    args += [do, states, dsf]
    f32 = jnp.float32
    kernel = functools.partial(_bwd_kernel, scale=scale, sub_chunk=sub_chunk, scalar=scalar, n_chunks=n)
    out_shape = (
        layout.out_shape("k_out", bsz, t_len, f32),
        layout.out_shape("k_out", bsz, t_len, f32),
        layout.out_shape("v", bsz, t_len, f32),
        layout.out_shape(bkind, bsz, t_len, f32),
        jax.ShapeDtypeStruct((bsz, heads, dv, dk), f32),
    )
    cost = scan_cost(
        bsz,
        heads,
        n,
        chunk,
        dk,
        dv,
        scalar=scalar,
        sub=sub_chunk,
        operands=args,
        outputs=out_shape,
        rep=layout.rep if layout.kind == "time" else 1,
        backward=True,
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        cost_estimate=cost,
        grid=(bsz, heads, n),
        in_specs=in_specs,
        out_specs=(spec("k_out"), spec("k_out"), spec("v"), spec(bkind), state),
        scratch_shapes=[pltpu.VMEM((dv, dk), jnp.float32)],
        compiler_params=tpu_params(("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="gated_linear_scan_bwd",
    )(*args)
