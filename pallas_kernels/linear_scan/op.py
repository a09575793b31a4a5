"""Custom VJP of the chunked scan: Pallas forward, exact backward by differentiating the XLA chunked path.

The backward is ``jax.vjp`` of ``reference.scan_xla``, which runs the *same* chunk math (same non-positive
exponents) with ``lax.scan`` over chunks, so the gradient is exact (not a surrogate); it is XLA, not a Pallas
kernel (see docs/kernels.md, "not done").
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

    def xla(q, k, v, g, st0):
        b = reference.chunk_cumsum(g, st.chunk)
        return reference.scan_xla(q, k, v, b, st0, scale=st.scale, chunk=st.chunk, sub_chunk=st.sub_chunk)

    _, vjp = jax.vjp(xla, q, k, v, g, st0)
    dq, dk, dv, dg, dst0 = vjp((do.astype(jnp.float32), dsf.astype(jnp.float32)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype), dst0.astype(st0.dtype)


scan_op.defvjp(_fwd, _bwd)
