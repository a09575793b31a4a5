"""Custom VJP of the chunked scan.

Forward: the Pallas scan kernel; it saves only its inputs. Backward (TPU kernels):

1. a ``states_only`` pass of the forward kernel recomputes the state entering every chunk (no outputs, one
   ``[Dv, C] x [C, Dk]`` matmul per chunk);
2. the reverse-time kernel walks the chunks from last to first carrying ``dS^T`` in VMEM and produces dq, dk, dv
   and the gradient of the chunk-local cumulative gates (``reference.chunk_step_bwd``);
3. XLA turns the cumulative-gate gradient into the raw-gate gradient (reverse cumulative sum inside each chunk).

The Mosaic GPU family has no working kernels for the scan yet (docs/kernels.md); its backward is ``jax.vjp`` of
``reference.scan_xla`` (the same chunk math with ``lax.scan``), so interpret-mode runs of it stay exact.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.linear_scan import reference


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    chunk: int
    sub_chunk: int
    backend: str
    interpret: bool


def _brow(b, chunk):
    bsz, heads, t_len, _ = b.shape
    return b.reshape(bsz, heads, t_len // chunk, 1, chunk)


def _kernel_call(q, k, v, g, st0, st: _Static):
    from pallas_kernels.linear_scan import gpu, tpu  # imported here: gpu imports tpu

    b = reference.chunk_cumsum(g, st.chunk)
    scalar = g.shape[-1] == 1
    mod = tpu if st.backend == "tpu" else gpu
    return mod.scan_call(q, k, v, b, _brow(b, st.chunk) if scalar else None, st0, scale=st.scale, chunk=st.chunk,
                         sub_chunk=st.sub_chunk, out_dtype=v.dtype, interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def scan_op(q, k, v, g, st0, st: _Static):
    """q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; g: raw log-gates [B, H, T, Dk or 1]; st0: [B, H, Dv, Dk] float32;
    T a multiple of the chunk. Returns (o [B, H, T, Dv] in v.dtype, S^T [B, H, Dv, Dk] float32)."""
    return _kernel_call(q, k, v, g, st0, st)


def _fwd(q, k, v, g, st0, st):
    return _kernel_call(q, k, v, g, st0, st), (q, k, v, g, st0)


def _bwd(st, res, cts):
    q, k, v, g, st0 = res
    do, dsf = cts
    if st.backend == "tpu":
        from pallas_kernels.linear_scan import tpu

        b = reference.chunk_cumsum(g, st.chunk)
        brow = _brow(b, st.chunk) if g.shape[-1] == 1 else None
        states, _ = tpu.scan_call(q, k, v, b, brow, st0, scale=st.scale, chunk=st.chunk, sub_chunk=st.sub_chunk,
                                  out_dtype=jnp.float32, interpret=st.interpret, states_only=True)
        dq, dk, dv, db, dst0 = tpu.scan_bwd_call(q, k, v, b, brow, do, states, dsf.astype(jnp.float32),
                                                 scale=st.scale, chunk=st.chunk, sub_chunk=st.sub_chunk,
                                                 interpret=st.interpret)
        bsz, heads, t_len, x = db.shape
        dbc = db.reshape(bsz, heads, t_len // st.chunk, st.chunk, x)
        dg = jnp.flip(jnp.cumsum(jnp.flip(dbc, 3), axis=3), 3).reshape(db.shape)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype), dst0.astype(st0.dtype)

    def xla(q, k, v, g, st0):
        b = reference.chunk_cumsum(g, st.chunk)
        return reference.scan_xla(q, k, v, b, st0, scale=st.scale, chunk=st.chunk, sub_chunk=st.sub_chunk)

    _, vjp = jax.vjp(xla, q, k, v, g, st0)
    dq, dk, dv, dg, dst0 = vjp((do.astype(jnp.float32), dsf.astype(jnp.float32)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype), dst0.astype(st0.dtype)


scan_op.defvjp(_fwd, _bwd)
