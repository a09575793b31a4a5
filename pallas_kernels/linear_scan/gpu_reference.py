"""The Mosaic GPU scan ops in plain XLA (float32): references for ``gpu.scalar_scan`` and ``gpu.vector_scan`` (same
arguments and chunking; the vector-gate form uses the kernels' sub-chunk factorisation)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.linear_scan import reference


def vector_scan_xla(q, k, v, g, s0, scale, chunk, sub):
    """The vector-gate scan in plain XLA with the kernel's factorisation (float32), a reference for
    ``gpu.vector_scan``. Arguments as ``vector_scan``; returns
    ``(o [B, T, H, Dv], S [B, H, Dk, Dv])`` float32.

    Intra-chunk scores are whole ``[C, C]`` matrices per chunk (batched over all chunks, no per-column loop):
    diagonal sub-chunk blocks ``qm km^T`` (both referred to the block's middle row), earlier sub-chunks through
    ``(qm exp(m_i - e_j)) (k exp(e_j - b_s))^T``; the states entering the chunks come from a ``lax.scan`` over
    the chunks. Dropped entries are removed with ``where`` (selection), so a large product there leaves no trace in
    the values and none in the gradients (their cotangent is zero)."""
    f32 = jnp.float32
    bsz, t_len, heads, dk = q.shape
    dv = v.shape[-1]
    n, n_sub, ell = t_len // chunk, chunk // sub, sub
    chunks = lambda a: jnp.moveaxis(a.astype(f32).reshape((bsz, n, chunk, heads, a.shape[-1])), 3, 1)
    qc, kc, vc, gc = chunks(q) * scale, chunks(k), chunks(v), chunks(g)  # [B, H, n, C, X]
    b = jnp.cumsum(gc, axis=3)
    split = lambda a: a.reshape(a.shape[:3] + (n_sub, ell, a.shape[-1]))  # [B, H, n, n_sub, L, X]
    bs, qs, ks = split(b), split(qc), split(kc)
    m = bs[..., (ell - 1) // 2, :]  # [B, H, n, n_sub, Dk]
    e = bs[..., ell - 1, :]
    qm = qs * jnp.exp(bs - m[..., None, :])
    km = ks * jnp.exp(m[..., None, :] - bs)
    tri = jnp.arange(ell)[:, None] >= jnp.arange(ell)[None, :]
    a_diag = jnp.where(tri, jnp.einsum("...td,...sd->...ts", qm, km), 0.0)  # [B, H, n, n_sub, L, L]
    eye = jnp.eye(n_sub, dtype=f32)
    a_diag = jnp.einsum("...its,ij->...itjs", a_diag, eye)
    earlier = jnp.arange(n_sub)[:, None] > jnp.arange(n_sub)[None, :]  # [i, j]: j < i
    qf = jnp.exp(jnp.where(earlier[:, :, None], m[..., :, None, :] - e[..., None, :, :], 0.0))  # [.., i, j, Dk]
    kend = ks * jnp.exp(e[..., None, :] - bs)  # k exp(e_j - b_s) <= 1
    a_off = jnp.einsum("...itd,...ijd,...jsd->...itjs", qm, qf, kend)
    a_off = jnp.where(earlier[:, None, :, None], a_off, 0.0)
    attn = (a_diag + a_off).reshape(b.shape[:3] + (chunk, chunk))
    o = jnp.einsum("...ts,...se->...te", attn, vc)
    b_last = b[..., -1, :]  # [B, H, n, Dk]
    upd = jnp.einsum("...sd,...se->...de", kc * jnp.exp(b_last[..., None, :] - b), vc)  # [B, H, n, Dk, Dv]

    def step(st, xs):
        dec, u = xs
        return jnp.exp(dec)[..., None] * st + u, st

    final, starts = lax.scan(step, s0.astype(f32), (jnp.moveaxis(b_last, 2, 0), jnp.moveaxis(upd, 2, 0)))
    o = o + jnp.einsum("...td,...de->...te", qc * jnp.exp(b), jnp.moveaxis(starts, 0, 2))
    o = jnp.moveaxis(o, 1, 3).reshape(bsz, t_len, heads, dv)
    return o, final


def scalar_scan_xla(q, k, v, g, s0, chunk):
    """The same scan on the XLA chunked path (``reference.scan_xla``), float32: a reference for
    ``gpu.scalar_scan``."""
    rep = v.shape[2] // q.shape[2]
    hm = lambda a: jnp.swapaxes(jnp.repeat(a, rep, axis=2) if a.shape[2] != v.shape[2] else a, 1, 2)
    b = reference.chunk_cumsum(jnp.swapaxes(g, 1, 2)[..., None], chunk)
    o, st = reference.scan_xla(
        hm(q.astype(jnp.float32)),
        hm(k.astype(jnp.float32)),
        hm(v.astype(jnp.float32)),
        b,
        jnp.swapaxes(s0, 2, 3),
        scale=1.0,
        chunk=chunk,
        sub_chunk=chunk,
    )
    return jnp.swapaxes(o, 1, 2), jnp.swapaxes(st, 2, 3)
