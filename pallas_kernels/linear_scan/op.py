"""Custom VJP of the chunked scan.

Forward: the Pallas scan kernel; it saves only its inputs. Backward (TPU kernels):

1. a ``states_only`` pass of the forward kernel recomputes the state entering every chunk (no outputs, one
   ``[Dv, C] x [C, Dk]`` matmul per chunk);
2. the reverse-time kernel walks the chunks from last to first carrying ``dS^T`` in VMEM and produces dq, dk, dv
   and the gradient of the chunk-local cumulative gates (``reference.chunk_step_bwd``);
3. XLA turns the cumulative-gate gradient into the raw-gate gradient (reverse cumulative sum inside each chunk) and
   sums the q/k gradients of heads that share a group.

This op serves the TPU kernels, and interpret-mode runs of their body for ``backend="gpu"`` (plain
``interpret=True``), whose backward is ``jax.vjp`` of ``reference.scan_xla`` (the same chunk math with ``lax.scan``,
head-major layout). The Mosaic GPU scans (scalar and vector gates) are different kernels with their own custom VJPs,
``gpu.scalar_scan`` / ``gpu.vector_scan`` (docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.linear_scan import reference, tpu
from pallas_kernels.linear_scan.tpu import ScanLayout


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    chunk: int
    sub_chunk: int
    backend: str
    interpret: bool
    layout: ScanLayout
    scalar: bool


def _cumsum(g, chunk):
    """Chunk-local cumulative log-gates in float32, for head-major ``[B, H, T, X]`` or time-major ``[B, T, HX]``."""
    if g.ndim == 4:
        return reference.chunk_cumsum(g, chunk)
    bsz, t_len, x = g.shape
    return jnp.cumsum(g.astype(jnp.float32).reshape(bsz, t_len // chunk, chunk, x), axis=2).reshape(g.shape)


def _rev_cumsum(db, chunk):
    time_axis = 2 if db.ndim == 4 else 1
    shape = db.shape
    split = shape[:time_axis] + (shape[time_axis] // chunk, chunk) + shape[time_axis + 1 :]
    dbc = db.reshape(split)
    return jnp.flip(jnp.cumsum(jnp.flip(dbc, time_axis + 1), axis=time_axis + 1), time_axis + 1).reshape(shape)


def _brow(b, chunk):
    bsz, heads, t_len, _ = b.shape
    return b.reshape(bsz, heads, t_len // chunk, 1, chunk)


def _kernel_call(q, k, v, g, st0, st: _Static):
    b = _cumsum(g, st.chunk)
    scalar = st.scalar
    return tpu.scan_call(
        q,
        k,
        v,
        b,
        _brow(b, st.chunk) if scalar else None,
        st0,
        layout=st.layout,
        scale=st.scale,
        chunk=st.chunk,
        sub_chunk=st.sub_chunk,
        out_dtype=v.dtype,
        interpret=st.interpret,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def scan_op(q, k, v, g, st0, st: _Static):
    """Operands in ``st.layout`` (see ``tpu.ScanLayout``); g: raw log-gates (vector gates like k per head, scalar
    gates ``[B, H, T, 1]``); st0: ``[B, H, Dv, Dk]`` float32; T a multiple of the chunk.
    Returns ``(o like v, S^T [B, H, Dv, Dk] float32)``."""
    return _kernel_call(q, k, v, g, st0, st)


def _fwd(q, k, v, g, st0, st):
    return _kernel_call(q, k, v, g, st0, st), (q, k, v, g, st0)


def _group_sum(dx, layout: ScanLayout):
    """Per-head q/k gradients ``[B, T, H*Dk]`` summed over the heads of each group -> ``[B, T, G*Dk]``."""
    if layout.kind == "head" or layout.rep == 1:
        return dx
    bsz, t_len, _ = dx.shape
    return dx.reshape(bsz, t_len, layout.heads // layout.rep, layout.rep, layout.dk).sum(3).reshape(bsz, t_len, -1)


def _bwd(st, res, cts):
    q, k, v, g, st0 = res
    do, dsf = cts
    if st.backend == "tpu":
        b = _cumsum(g, st.chunk)
        brow = _brow(b, st.chunk) if st.scalar else None
        kw = dict(layout=st.layout, scale=st.scale, chunk=st.chunk, sub_chunk=st.sub_chunk, interpret=st.interpret)
        states, _ = tpu.scan_call(q, k, v, b, brow, st0, out_dtype=jnp.float32, states_only=True, **kw)
        dq, dk, dv, db, dst0 = tpu.scan_bwd_call(q, k, v, b, brow, do, states, dsf.astype(jnp.float32), **kw)
        dq, dk = _group_sum(dq, st.layout), _group_sum(dk, st.layout)
        dg = _rev_cumsum(db, st.chunk)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype), dst0.astype(st0.dtype)

    def xla(q, k, v, g, st0):
        b = reference.chunk_cumsum(g, st.chunk)
        return reference.scan_xla(q, k, v, b, st0, scale=st.scale, chunk=st.chunk, sub_chunk=st.sub_chunk)

    _, vjp = jax.vjp(xla, q, k, v, g, st0)
    dq, dk, dv, dg, dst0 = vjp((do.astype(jnp.float32), dsf.astype(jnp.float32)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype), dst0.astype(st0.dtype)


scan_op.defvjp(_fwd, _bwd)
