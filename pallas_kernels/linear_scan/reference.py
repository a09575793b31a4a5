"""References for the gated linear-attention scan: float64 token loops (GLA and Mamba2 SSD), and the chunk math
shared by the Pallas kernel and the XLA chunked path.

GLA (per batch b, head h): ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = (scale q_t)^T S_t``;
``S`` is ``[Dk, Dv]``. SSD: ``h_t = exp(dt_t A_h) h_{t-1} + (dt_t x_t) B_t^T``, ``y_t = h_t C_t + D_h x_t``; ``h`` is
``[P, N]``. SSD is GLA with ``q <- C``, ``k <- B``, ``v <- dt x``, a scalar gate ``dt A`` and ``S = h^T``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def gla_reference(q, k, v, log_gate, scale=None, initial_state=None):
    """float64 loop. q, k, log_gate: [B, T, H, Dk]; v: [B, T, H, Dv] -> (o [B, T, H, Dv], S [B, H, Dk, Dv])."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, log_gate))
    bsz, t_len, heads, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    s = np.zeros((bsz, heads, dk, v.shape[-1])) if initial_state is None else np.array(initial_state, np.float64)
    o = np.zeros(v.shape)
    for t in range(t_len):
        s = np.exp(g[:, t])[..., None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = np.einsum("bhk,bhkv->bhv", scale * q[:, t], s)
    return o, s


def ssd_reference(x, dt, a, b, c, d=None, initial_state=None):
    """float64 loop. x: [B, T, H, P], dt: [B, T, H], a: [H], b/c: [B, T, G, N] (H % G == 0), d: [H]
    -> (y [B, T, H, P], h [B, H, P, N])."""
    x, dt, a, b, c = (np.asarray(z, np.float64) for z in (x, dt, a, b, c))
    bsz, t_len, heads, p = x.shape
    rep = heads // b.shape[2]
    b, c = np.repeat(b, rep, axis=2), np.repeat(c, rep, axis=2)
    h = np.zeros((bsz, heads, p, b.shape[-1])) if initial_state is None else np.array(initial_state, np.float64)
    y = np.zeros(x.shape)
    for t in range(t_len):
        decay = np.exp(dt[:, t] * a)[..., None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * b[:, t, :, None, :]
        y[:, t] = np.einsum("bhpn,bhn->bhp", h, c[:, t])
        if d is not None:
            y[:, t] += np.asarray(d, np.float64)[:, None] * x[:, t]
    return y, h


# --- chunk math (float32), shared by the kernel body and the XLA chunked path -------------------------------------

def _dot_nt(a, b):
    """``a @ b^T`` for a: [m, k], b: [n, k]."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """``a^T @ b`` for a: [k, m], b: [k, n]."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def chunk_step(st, q, k, v, b, brow=None, *, scale, sub_chunk):
    """One chunk of the gated scan.

    Args:
      st: ``[Dv, Dk]`` float32 state *transposed* (``S^T``) entering the chunk.
      q, k: ``[C, Dk]``; v: ``[C, Dv]``.
      b: float32 cumulative log-gate within the chunk, ``[C, Dk]`` (vector gates) or ``[C, 1]`` (scalar gates);
        non-increasing down the rows, so every ``exp`` below is of a non-positive difference.
      brow: ``[1, C]`` = ``b^T`` for scalar gates (passed separately so the kernel needs no transpose); else None.
      scale: multiplies q.
      sub_chunk: secondary chunk for vector gates (must divide C).
    Returns:
      (list of output row blocks (float32, concatenating to ``[C, Dv]``), new ``st``).
    """
    c_len = q.shape[0]
    qf = q.astype(jnp.float32) * scale
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    b_last = b[c_len - 1:c_len]  # [1, Dk] or [1, 1]
    decay_last = jnp.exp(b_last)
    if brow is not None:  # scalar gate: one [C, C] decay matrix, one matmul for the intra-chunk part
        o_inter = _dot_nt(qf * jnp.exp(b), st)
        rows = jax.lax.broadcasted_iota(jnp.int32, (c_len, c_len), 0)
        cols = jax.lax.broadcasted_iota(jnp.int32, (c_len, c_len), 1)
        decay = jnp.exp(jnp.where(rows >= cols, b - brow, -jnp.inf))
        parts = [o_inter + _dot(_dot_nt(qf, kf) * decay, vf)]
    else:
        n_sub = c_len // sub_chunk
        parts = []
        for i in range(n_sub):
            lo = i * sub_chunk
            q_i, b_i = qf[lo:lo + sub_chunk], b[lo:lo + sub_chunk]
            o_i = _dot_nt(q_i * jnp.exp(b_i), st)
            for j in range(i):  # earlier sub-chunks: decay split at the end of sub-chunk j
                jl = j * sub_chunk
                ref = b[jl + sub_chunk - 1:jl + sub_chunk]
                a_ij = _dot_nt(q_i * jnp.exp(b_i - ref), kf[jl:jl + sub_chunk] * jnp.exp(ref - b[jl:jl + sub_chunk]))
                o_i = o_i + _dot(a_ij, vf[jl:jl + sub_chunk])
            tri = jax.lax.broadcasted_iota(jnp.int32, (sub_chunk, 1), 0)
            for s in range(sub_chunk):  # diagonal sub-chunk: column s of the masked score matrix at a time
                idx = lo + s
                e = jnp.exp(jnp.where(tri >= s, b_i - b[idx:idx + 1], -jnp.inf))
                a_col = jnp.sum(q_i * e * kf[idx:idx + 1], axis=1, keepdims=True)  # [c, 1]
                o_i = o_i + a_col * vf[idx:idx + 1]
            parts.append(o_i)
    st_new = st * decay_last + _dot_tn(vf, kf * jnp.exp(b_last - b))
    return parts, st_new


def chunk_cumsum(g, chunk):
    """Chunk-local inclusive cumulative sum over time of ``g: [B, H, T, X]`` (float32), T a multiple of chunk."""
    bsz, heads, t_len, x = g.shape
    return jnp.cumsum(g.astype(jnp.float32).reshape(bsz, heads, t_len // chunk, chunk, x), axis=3).reshape(g.shape)


def scan_xla(q, k, v, b, st0, *, scale, chunk, sub_chunk):
    """XLA chunked scan with the kernel's math. q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; b: chunk-local cumulative
    log-gates [B, H, T, Dk or 1]; st0: [B, H, Dv, Dk] float32. T must be a multiple of chunk.
    Returns (o [B, H, T, Dv] float32, st [B, H, Dv, Dk])."""
    bsz, heads, t_len, _ = q.shape
    n = t_len // chunk
    split = lambda a: jnp.moveaxis(a.reshape(bsz, heads, n, chunk, a.shape[-1]), 2, 0)
    scalar = b.shape[-1] == 1 and q.shape[-1] != 1

    def one(st, xs):
        qc, kc, vc, bc = xs
        brow = jnp.swapaxes(bc, -1, -2) if scalar else None
        fn = lambda s, q_, k_, v_, b_, br: chunk_step(s, q_, k_, v_, b_, br, scale=scale, sub_chunk=sub_chunk)
        if scalar:
            parts, st = jax.vmap(jax.vmap(fn))(st, qc, kc, vc, bc, brow)
        else:
            parts, st = jax.vmap(jax.vmap(lambda s, q_, k_, v_, b_: fn(s, q_, k_, v_, b_, None)))(st, qc, kc, vc, bc)
        return st, jnp.concatenate(parts, axis=-2)

    st, o = jax.lax.scan(one, st0, (split(q), split(k), split(v), split(b)))
    return jnp.moveaxis(o, 0, 2).reshape(bsz, heads, t_len, v.shape[-1]), st
