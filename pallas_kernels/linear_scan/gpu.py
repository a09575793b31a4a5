"""The Mosaic GPU scan ops: ``scalar_scan`` (Mamba2 SSD, one gate per head) and ``vector_scan`` (GLA, one gate per
key channel), custom VJPs pairing the forward kernels of ``gpu_fwd`` with the backward kernels of ``gpu_bwd`` (two
state passes, then per-chunk dq/dk and dv kernels; XLA for the gate gradient). ``gpu_plan`` says which sizes they
take; ``gpu_reference`` has the same ops in plain XLA."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.linear_scan import gpu_bwd
from pallas_kernels.linear_scan.gpu_fwd import gla_scan_fwd, prep_gates, prep_vector_gates, ssd_scan_fwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def vector_scan(q, k, v, g, s0, scale, chunk, sub, block_dv, interpret):
    """Vector-gate scan ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = (scale q_t)^T S_t`` on the wgmma kernel.

    q, k, g: ``[B, T, H, Dk]`` (g raw float32 log-gates); v: ``[B, T, H, Dv]``; s0: ``[B, H, Dk, Dv]`` float32.
    T a multiple of ``chunk``, ``sub`` divides ``chunk``. Returns ``(o [B, T, H, Dv] float32 if v is float32 else
    bfloat16, S [B, H, Dk, Dv] float32)``; the matmuls are bfloat16 either way. The backward runs the Mosaic GPU
    kernels of ``gpu_bwd`` (``gpu_bwd.vector_scan_bwd``; the same ``interpret``), recomputing the chunk states from
    the saved inputs.
    """
    qm, kmt, fac = prep_vector_gates(q, k, g, scale=scale, chunk=chunk, sub=sub)
    return gla_scan_fwd(
        qm,
        kmt,
        v.astype(jnp.bfloat16),
        fac,
        s0,
        chunk=chunk,
        sub=sub,
        block_dv=block_dv,
        out_dtype=jnp.float32 if v.dtype == jnp.float32 else jnp.bfloat16,
        interpret=interpret,
    )


def _vector_scan_fwd(q, k, v, g, s0, scale, chunk, sub, block_dv, interpret):
    return vector_scan(q, k, v, g, s0, scale, chunk, sub, block_dv, interpret), (q, k, v, g, s0)


def _vector_scan_bwd(scale, chunk, sub, block_dv, interpret, res, cts):
    grads = gpu_bwd.vector_scan_bwd(
        *res, *cts, scale=scale, chunk=chunk, sub=sub, block_dv=block_dv, interpret=interpret
    )
    return tuple(d.astype(a.dtype) for d, a in zip(grads, res))


vector_scan.defvjp(_vector_scan_fwd, _vector_scan_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def scalar_scan(q, k, v, g, s0, chunk, block_dv, interpret):
    """Scalar-gate scan ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = q_t^T S_t`` on the wgmma kernel.

    q, k: ``[B, T, G, Dk]`` (head h uses group ``h // (H/G)``); v: ``[B, T, H, Dv]``; g: ``[B, T, H]`` float32 raw
    log-gates; s0: ``[B, H, Dk, Dv]`` float32. T a multiple of ``chunk``. Returns ``(o [B, T, H, Dv] in v.dtype
    (bfloat16 or float32; the matmuls are bfloat16 either way), S [B, H, Dk, Dv] float32)``. The backward runs the
    Mosaic GPU kernels of ``gpu_bwd`` (``gpu_bwd.scalar_scan_bwd``; the same ``interpret``).
    """
    b, eb, ek, last = prep_gates(g, chunk)
    bsz, heads, n = last.shape[:3]
    sdec = jnp.broadcast_to(last, (bsz, heads, n, q.shape[-1]))
    kt = jnp.swapaxes(jnp.swapaxes(k.astype(jnp.bfloat16), 1, 2), 2, 3)  # [B, G, Dk, T]
    return ssd_scan_fwd(
        q.astype(jnp.bfloat16),
        kt,
        v.astype(jnp.bfloat16),
        b,
        eb,
        ek,
        sdec,
        s0,
        chunk=chunk,
        block_dv=block_dv,
        rep=v.shape[2] // q.shape[2],
        out_dtype=jnp.float32 if v.dtype == jnp.float32 else jnp.bfloat16,
        interpret=interpret,
    )


def _scalar_scan_fwd(q, k, v, g, s0, chunk, block_dv, interpret):
    return scalar_scan(q, k, v, g, s0, chunk, block_dv, interpret), (q, k, v, g, s0)


def _scalar_scan_bwd(chunk, block_dv, interpret, res, cts):
    grads = gpu_bwd.scalar_scan_bwd(*res, *cts, chunk=chunk, block_dv=block_dv, interpret=interpret)
    return tuple(d.astype(a.dtype) for d, a in zip(grads, res))


scalar_scan.defvjp(_scalar_scan_fwd, _scalar_scan_bwd)
