"""Mamba2's state-space duality (SSD) scan, a scalar-decay selective SSM per head: the XLA implementations behind
``api.ssd`` (token scan, chunked form, decode step; the op checks the arguments).

Per head ``h`` (group ``g = h // (H / G)``), with state ``S_t: [P, N]``::

    S_t = exp(dt_t * A_h) S_{t-1} + (dt_t x_t) B_t^T
    y_t = S_t C_t + D_h x_t

``dt`` is the already-softplus'ed step size (``> 0``) and ``A < 0``, so ``a_t = dt_t A_h <= 0``.

Chunked form. With ``G_t`` the inclusive cumulative ``a`` from the chunk start and ``D_ts = exp(G_t - G_s)``
(``s <= t``, exponent ``<= 0``): ``Y = ((C B^T) * D) (dt X) + exp(G) C S_0^T + D x`` and
``S_C = exp(G_C) S_0 + sum_s exp(G_C - G_s) (dt_s x_s) B_s^T``; only the state recurrence is a ``lax.scan``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import round_up
from pallas_kernels.linear_scan import chunked as cu

__all__ = ["ssd_step", "ssd_reference", "ssd_chunked"]


def _to_heads(m, h):
    """``[..., groups, N]`` -> ``[..., heads, N]``: head ``h`` reads group ``h // (H / G)``."""
    return jnp.repeat(m.astype(jnp.float32), h // m.shape[-2], axis=-2)


def _step_f32(state, x_t, dt_t, a, b_t, c_t):
    """state [B, H, P, N]; x_t [B, H, P]; dt_t [B, H]; a [H]; b_t, c_t [B, H, N]."""
    state = jnp.exp(dt_t * a)[..., None, None] * state + (dt_t[..., None] * x_t)[..., :, None] * b_t[..., None, :]
    return jnp.einsum("bhpn,bhn->bhp", state, c_t), state


def ssd_step(x_t, dt_t, A, B_t, C_t, state, D=None):
    """One decoding step.

    Args:
      x_t: ``[batch, heads, head_dim]``; dt_t: ``[batch, heads]``; A, D: ``[heads]``; B_t, C_t:
        ``[batch, groups, state]``; state: ``[batch, heads, head_dim, state]``.
    Returns:
      ``(y_t [batch, heads, head_dim] in x's dtype, new_state float32)``.
    """
    want = x_t.shape + (B_t.shape[-1],)
    if state.shape != want:
        raise ValueError(f"ssd_step: state must be [batch, heads, head_dim, state]={want}, got {state.shape}")
    h = x_t.shape[1]
    f = lambda a: a.astype(jnp.float32)
    y, s = _step_f32(f(state), f(x_t), f(dt_t), f(A), _to_heads(B_t, h), _to_heads(C_t, h))
    if D is not None:
        y = y + f(D)[:, None] * f(x_t)
    return y.astype(x_t.dtype), s


def _init_state(initial_state, b, h, p, n):
    if initial_state is None:
        return jnp.zeros((b, h, p, n), jnp.float32)
    return initial_state.astype(jnp.float32)


def ssd_reference(x, dt, A, B, C, D=None, *, initial_state=None):
    """Token-by-token ``lax.scan``. Same arguments/returns as ``api.ssd``."""
    b, _, h, p = x.shape
    xs = (
        jnp.moveaxis(x.astype(jnp.float32), 1, 0),
        jnp.moveaxis(dt.astype(jnp.float32), 1, 0),
        jnp.moveaxis(_to_heads(B, h), 1, 0),
        jnp.moveaxis(_to_heads(C, h), 1, 0),
    )
    a = A.astype(jnp.float32)

    def body(state, inp):
        x_t, dt_t, b_t, c_t = inp
        y_t, state = _step_f32(state, x_t, dt_t, a, b_t, c_t)
        return state, y_t

    final, y = jax.lax.scan(body, _init_state(initial_state, b, h, p, B.shape[-1]), xs)
    y = jnp.moveaxis(y, 0, 1)
    if D is not None:
        y = y + D.astype(jnp.float32)[:, None] * x.astype(jnp.float32)
    return y.astype(x.dtype), final


def ssd_chunked(x, dt, A, B, C, D, initial_state, chunk_size):
    bsz, t, h, p = x.shape
    n = B.shape[-1]
    c = cu.effective_chunk(t, chunk_size)
    tp = round_up(t, c)
    xf = x.astype(jnp.float32)
    dtf = dt.astype(jnp.float32)
    # Padded steps: dt 0 gives decay exp(0) = 1 and a zero input, i.e. the identity transition.
    xdt = cu.to_chunks(cu.pad_time(xf * dtf[..., None], tp), c)  # [B, H, Nc, C, P]
    a = cu.to_chunks(cu.pad_time(dtf * A.astype(jnp.float32), tp), c)  # [B, H, Nc, C]
    bc, cc = (cu.to_chunks(cu.pad_time(_to_heads(m, h), tp), c) for m in (B, C))  # [B, H, Nc, C, N]
    gcum = jnp.cumsum(a, axis=-1)
    decay = cu.masked_exp(gcum[..., :, None] - gcum[..., None, :], cu.causal_mask(c))
    scores = jnp.einsum("...tn,...sn->...ts", cc, bc) * decay
    y = jnp.einsum("...ts,...sp->...tp", scores, xdt)

    g_last = gcum[..., -1]  # [B, H, Nc]
    b_end = bc * jnp.exp(g_last[..., None] - gcum)[..., None]  # exponent <= 0
    upd = jnp.einsum("...sp,...sn->...pn", xdt, b_end)  # [B, H, Nc, P, N]

    def body(state, inp):
        gl, u = inp
        return jnp.exp(gl)[..., None, None] * state + u, state

    final, starts = jax.lax.scan(
        body, _init_state(initial_state, bsz, h, p, n), (jnp.moveaxis(g_last, 2, 0), jnp.moveaxis(upd, 2, 0))
    )
    starts = jnp.moveaxis(starts, 0, 2)  # [B, H, Nc, P, N]
    y = y + jnp.einsum("...tn,...pn->...tp", cc * jnp.exp(gcum)[..., None], starts)
    y = cu.from_chunks(y, t)
    if D is not None:
        y = y + D.astype(jnp.float32)[:, None] * xf
    return y.astype(x.dtype), final
