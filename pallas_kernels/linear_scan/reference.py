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
    scale = dk**-0.5 if scale is None else scale
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
    b_last = b[c_len - 1 : c_len]  # [1, Dk] or [1, 1]
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
            q_i, b_i = qf[lo : lo + sub_chunk], b[lo : lo + sub_chunk]
            o_i = _dot_nt(q_i * jnp.exp(b_i), st)
            for j in range(i):  # earlier sub-chunks: decay split at the end of sub-chunk j
                jl = j * sub_chunk
                ref = b[jl + sub_chunk - 1 : jl + sub_chunk]
                a_ij = _dot_nt(
                    q_i * jnp.exp(b_i - ref), kf[jl : jl + sub_chunk] * jnp.exp(ref - b[jl : jl + sub_chunk])
                )
                o_i = o_i + _dot(a_ij, vf[jl : jl + sub_chunk])
            tri = jax.lax.broadcasted_iota(jnp.int32, (sub_chunk, 1), 0)
            for s in range(sub_chunk):  # diagonal sub-chunk: column s of the masked score matrix at a time
                idx = lo + s
                e = jnp.exp(jnp.where(tri >= s, b_i - b[idx : idx + 1], -jnp.inf))
                a_col = jnp.sum(q_i * e * kf[idx : idx + 1], axis=1, keepdims=True)  # [c, 1]
                o_i = o_i + a_col * vf[idx : idx + 1]
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


def chunk_step_bwd(st, dst, q, k, v, b, do, brow=None, *, scale, sub_chunk, scalar):
    """Backward of ``chunk_step`` for one chunk, the math of the reverse-time kernel.

    Args:
      st: ``[Dv, Dk]`` float32 state (transposed) *entering* the chunk (recomputed by a forward states pass).
      dst: ``[Dv, Dk]`` float32 gradient of the state *leaving* the chunk.
      q, k, v, b, brow: as in ``chunk_step`` (b ``[C, Dk]``, or ``[C, 1]`` when ``scalar``; brow ``[1, C]`` or None,
        then taken as ``b^T``); do: ``[C, Dv]``.
    Returns:
      ``(dq [C, Dk], dk [C, Dk], dv [C, Dv], db [C, Dk or 1], dst_in [Dv, Dk])``, float32; ``db`` is the gradient
      with respect to the chunk-local *cumulative* log-gates (the caller turns it into the raw-gate gradient with a
      reverse cumulative sum).

    Every term is a product of factors ``exp(non-positive difference)``; the gate gradient uses
    ``db = q * dq_hat - k * dk_hat`` (each score depends on ``b`` only through ``b_t - b_s``), plus the direct terms
    of the last row (state decay).
    """
    c_len = q.shape[0]
    qf = q.astype(jnp.float32) * scale
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    dof = do.astype(jnp.float32)
    b_last = b[c_len - 1 : c_len]
    eb = jnp.exp(b)
    e_last = jnp.exp(b_last - b)  # [C, Dk or 1]
    # inter-chunk term o += (q e^b) S0 and the state update S_C = e^{b_C} S0 + sum_s (k_s e^{b_C - b_s}) v_s^T
    dq = _dot(dof, st) * eb
    dk = _dot(vf, dst) * e_last  # state-update part first (needed alone for the last-row gate term)
    db_last = jnp.sum(st * dst, axis=0, keepdims=True) * jnp.exp(b_last) + jnp.sum(kf * dk, axis=0, keepdims=True)
    dv = _dot_nt(kf * e_last, dst)
    dst_in = dst * jnp.exp(b_last) + _dot_tn(dof, qf * eb)
    if scalar:
        rows = jax.lax.broadcasted_iota(jnp.int32, (c_len, c_len), 0)
        cols = jax.lax.broadcasted_iota(jnp.int32, (c_len, c_len), 1)
        brow = jnp.swapaxes(b, 0, 1) if brow is None else brow
        decay = jnp.exp(jnp.where(rows >= cols, b - brow, -jnp.inf))
        p = _dot_nt(dof, vf) * decay  # d(q k^T) entries
        dq = dq + _dot(p, kf)
        dk_intra = _dot_tn(p, qf)
        dv = dv + _dot_tn(_dot_nt(qf, kf) * decay, dof)
    else:
        n_sub = c_len // sub_chunk
        dq_parts, dk_parts, dv_parts = [], [], []
        for _ in range(n_sub):
            dq_parts.append(jnp.zeros((sub_chunk, qf.shape[1]), jnp.float32))
            dk_parts.append(jnp.zeros((sub_chunk, kf.shape[1]), jnp.float32))
            dv_parts.append(jnp.zeros((sub_chunk, vf.shape[1]), jnp.float32))
        tri = jax.lax.broadcasted_iota(jnp.int32, (sub_chunk, 1), 0)
        for i in range(n_sub):
            lo = i * sub_chunk
            q_i, b_i, do_i = qf[lo : lo + sub_chunk], b[lo : lo + sub_chunk], dof[lo : lo + sub_chunk]
            for j in range(i):
                jl = j * sub_chunk
                ref = b[jl + sub_chunk - 1 : jl + sub_chunk]
                eq = jnp.exp(b_i - ref)
                ek = jnp.exp(ref - b[jl : jl + sub_chunk])
                qi, kj = q_i * eq, kf[jl : jl + sub_chunk] * ek
                da = _dot_nt(do_i, vf[jl : jl + sub_chunk])  # [c, c]
                dq_parts[i] = dq_parts[i] + _dot(da, kj) * eq
                dk_parts[j] = dk_parts[j] + _dot_tn(da, qi) * ek
                dv_parts[j] = dv_parts[j] + _dot_tn(_dot_nt(qi, kj), do_i)
            for s in range(sub_chunk):
                idx = lo + s
                e = jnp.exp(jnp.where(tri >= s, b_i - b[idx : idx + 1], -jnp.inf))  # [c, Dk]
                qe = q_i * e
                a_col = jnp.sum(qe * kf[idx : idx + 1], axis=1, keepdims=True)  # [c, 1]
                da_col = jnp.sum(do_i * vf[idx : idx + 1], axis=1, keepdims=True)  # [c, 1]
                dq_parts[i] = dq_parts[i] + da_col * e * kf[idx : idx + 1]
                hit = tri == s
                dk_parts[i] = dk_parts[i] + jnp.where(hit, jnp.sum(da_col * qe, axis=0, keepdims=True), 0.0)
                dv_parts[i] = dv_parts[i] + jnp.where(hit, jnp.sum(a_col * do_i, axis=0, keepdims=True), 0.0)
        cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=0)
        dq = dq + cat(dq_parts)
        dk_intra = cat(dk_parts)
        dv = dv + cat(dv_parts)
    # gate gradient: q * dq_hat over every q-side term, minus k * dk_hat over every k-side term, plus the last row
    db = qf * dq - kf * (dk + dk_intra)
    last = jax.lax.broadcasted_iota(jnp.int32, (c_len, 1), 0) == c_len - 1
    db = db + jnp.where(last, db_last, 0.0)
    if scalar:
        db = jnp.sum(db, axis=1, keepdims=True)
    return dq * scale, dk + dk_intra, dv, db, dst_in
