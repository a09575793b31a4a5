"""Gated linear attention (GLA) with per-key-channel forget gates.

Per head, with state ``S_t: [Dk, Dv]``::

    S_t = diag(exp(log_gate_t)) S_{t-1} + k_t v_t^T
    o_t = (scale * q_t)^T S_t

The XLA implementations behind ``api.gla`` (which checks the arguments): a token-by-token ``lax.scan``
(:func:`gla_reference`, ``impl="reference"``), the chunked form (:func:`gla_chunked`, ``impl="xla"``; parallel inside a
chunk, ``lax.scan`` over chunks) and a one-token decode step (:func:`gla_step`).

Chunked form. Inside a chunk let ``b_t`` be the inclusive cumulative sum of ``log_gate`` from the chunk start
(``b_t <= 0``, non-increasing). The contribution of token ``s`` to ``o_t`` (``s <= t``) is
``sum_d q_td k_sd exp(b_td - b_sd) v_s``. Writing it as ``(q_t exp(b_t)) . (k_s exp(-b_s))`` would need the positive
exponent ``-b_s`` (overflow for strong gates), so the chunk is cut into sub-chunks of ``c`` tokens:

* pairs in the same sub-chunk: the ``[c, c, Dk]`` tensor ``exp(b_t - b_s)`` is materialised (masked to ``s <= t``
  before the exponential);
* pairs with ``s`` in an earlier sub-chunk than ``t`` (sub-chunk ``i`` starting at ``i*c``): with the reference point
  ``R_i = b_{i*c-1}``, ``b_t - b_s = (b_t - R_i) + (R_i - b_s)`` and both parts are ``<= 0``, so
  ``q_t exp(b_t - R_i)`` and ``k_s exp(R_i - b_s)`` are safe factors of a matmul.

Every exponent evaluated is thus a non-positive difference of float32 cumulative gates; nothing is clamped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import round_up
from pallas_kernels.linear_scan import chunked as cu

__all__ = ["gla_step", "gla_reference", "gla_chunked"]

_SUB_CHUNK = 16


def _step_f32(state, q_t, k_t, v_t, g_t):
    state = jnp.exp(g_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
    o_t = jnp.einsum("bhd,bhde->bhe", q_t, state)
    return o_t, state


def gla_step(q_t, k_t, v_t, log_gate_t, state, *, scale: float | None = None):
    """One decoding step.

    Args:
      q_t, k_t, log_gate_t: ``[batch, heads, key_dim]``; v_t: ``[batch, heads, value_dim]``.
      state: ``[batch, heads, key_dim, value_dim]``.
    Returns:
      ``(o_t [batch, heads, value_dim] in q's dtype, new_state float32)``.
    """
    want = q_t.shape + (v_t.shape[-1],)
    if state.shape != want:
        raise ValueError(f"gla_step: state must be [batch, heads, key_dim, value_dim]={want}, got {state.shape}")
    f = lambda a: a.astype(jnp.float32)
    o, s = _step_f32(f(state), f(q_t) * cu.query_scale(scale, q_t.shape[-1]), f(k_t), f(v_t), f(log_gate_t))
    return o.astype(q_t.dtype), s


def _init_state(initial_state, b, h, dk, dv):
    if initial_state is None:
        return jnp.zeros((b, h, dk, dv), jnp.float32)
    return initial_state.astype(jnp.float32)


def gla_reference(q, k, v, log_gate, *, scale=None, initial_state=None):
    """Token-by-token ``lax.scan`` over :func:`gla_step`'s math. Same arguments/returns as ``api.gla``."""
    b, _, h, dk = q.shape
    s0 = _init_state(initial_state, b, h, dk, v.shape[-1])
    xs = tuple(jnp.moveaxis(a.astype(jnp.float32), 1, 0) for a in (q, k, v, log_gate))
    sc = cu.query_scale(scale, dk)

    def body(state, inp):
        q_t, k_t, v_t, g_t = inp
        o_t, state = _step_f32(state, q_t * sc, k_t, v_t, g_t)
        return state, o_t

    final, o = jax.lax.scan(body, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), final


def _sub_chunk(c: int) -> int:
    return max(d for d in range(1, min(_SUB_CHUNK, c) + 1) if c % d == 0)


def gla_chunked(q, k, v, log_gate, scale, initial_state, chunk_size):
    bsz, t, h, dk = q.shape
    dv = v.shape[-1]
    c = cu.effective_chunk(t, chunk_size, multiple=min(_SUB_CHUNK, chunk_size))
    sub = _sub_chunk(c)
    n_sub = c // sub
    tp = round_up(t, c)
    # Padded steps: zero q/k/v and log-gate 0 (identity transition), so the final state is exact.
    qc, kc, vc, gc = (cu.to_chunks(cu.pad_time(a.astype(jnp.float32), tp), c) for a in (q, k, v, log_gate))
    qc = qc * cu.query_scale(scale, dk)
    bcum = jnp.cumsum(gc, axis=3)  # [B, H, N, C, Dk], inclusive, <= 0

    lead = bcum.shape[:3]
    b_sub = bcum.reshape(lead + (n_sub, sub, dk))
    q_sub = qc.reshape(lead + (n_sub, sub, dk))
    k_sub = kc.reshape(lead + (n_sub, sub, dk))

    # --- pairs inside one sub-chunk: materialise exp(b_t - b_s) for s <= t.
    tri = cu.causal_mask(sub)
    decay = cu.masked_exp(b_sub[..., :, None, :] - b_sub[..., None, :, :], tri[..., None])  # [.., n, c, c, Dk]
    a_diag = jnp.einsum("...td,...sd,...tsd->...ts", q_sub, k_sub, decay)
    # place the diagonal blocks into the [n_sub, sub, C] layout
    a_diag = jnp.einsum("...its,ij->...itjs", a_diag, jnp.eye(n_sub, dtype=jnp.float32))
    a_diag = a_diag.reshape(lead + (n_sub, sub, c))

    # --- pairs with s in an earlier sub-chunk: split at R_i = b at the last token before sub-chunk i.
    ref = jnp.concatenate([jnp.zeros(lead + (1, dk), jnp.float32), b_sub[..., :-1, -1, :]], axis=-2)  # [.., n, Dk]
    q_rel = q_sub * jnp.exp(b_sub - ref[..., None, :])  # exponent b_t - R_i <= 0
    before = jnp.arange(c)[None, :] < (jnp.arange(n_sub) * sub)[:, None]  # [n, C]: s precedes sub-chunk i
    k_rel = kc[..., None, :, :] * cu.masked_exp(ref[..., :, None, :] - bcum[..., None, :, :], before[..., None])
    a_off = jnp.einsum("...itd,...isd->...its", q_rel, k_rel)  # [.., n, sub, C]

    attn = (a_diag + a_off).reshape(lead + (c, c))
    o = jnp.einsum("...ts,...se->...te", attn, vc)

    # --- across chunks: state at each chunk start via lax.scan.
    b_last = bcum[..., -1, :]  # [B, H, N, Dk]
    k_end = kc * jnp.exp(b_last[..., None, :] - bcum)  # exponent <= 0
    upd = jnp.einsum("...sd,...se->...de", k_end, vc)  # [B, H, N, Dk, Dv]
    s0 = _init_state(initial_state, bsz, h, dk, dv)

    def body(state, inp):
        g_last, u = inp
        return jnp.exp(g_last)[..., None] * state + u, state

    final, starts = jax.lax.scan(body, s0, (jnp.moveaxis(b_last, 2, 0), jnp.moveaxis(upd, 2, 0)))
    starts = jnp.moveaxis(starts, 0, 2)  # [B, H, N, Dk, Dv]
    o = o + jnp.einsum("...td,...de->...te", qc * jnp.exp(bcum), starts)
    return cu.from_chunks(o, t).astype(q.dtype), final
