"""Gated delta rule (Gated DeltaNet) with a scalar decay per head: the XLA implementations behind
``api.gated_delta_rule`` (token scan, chunked form, decode step; the op checks the arguments).

Per head, with state ``S_t: [Dk, Dv]`` (decay first, then the delta update)::

    S'  = exp(g_t) S_{t-1}
    u_t = beta_t (v_t - S'^T k_t)
    S_t = S' + k_t u_t^T                       (= exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t k_t v_t^T)
    o_t = S_t^T (scale * q_t)

With ``use_qk_l2norm`` q and k are first normalised per head: ``x / sqrt(sum(x^2) + 1e-6)``.

Chunked form (UT / WY transform). Inside a chunk with start state ``S_0`` let ``G_t`` be the inclusive cumulative
log decay from the chunk start and ``D_ts = exp(G_t - G_s)`` for ``s <= t`` (exponent ``<= 0``). Unrolling,
``S_t = exp(G_t) S_0 + sum_{s<=t} D_ts k_s u_s^T`` and therefore

    u_t + beta_t sum_{s<t} D_ts (k_t . k_s) u_s = beta_t v_t - beta_t exp(G_t) S_0^T k_t.

This is a unit-lower-triangular system ``(I + L) U = beta V - (beta exp(G) K) S_0`` with
``L_ts = beta_t D_ts k_t.k_s`` (s < t). Solving it once per chunk for both right-hand sides gives
``U = U~ - W S_0`` with ``U~ = (I+L)^{-1} beta V`` and ``W = (I+L)^{-1} beta exp(G) K``, independent of ``S_0``
(the inverse by forward substitution, with a hand-written VJP: ``dR = (I+L)^{-T} dX``, ``dL = -tril(dR X^T)``).
Then ``O = scale exp(G) Q S_0 + (scale Q K^T * D)_{s<=t} U`` and ``S_C = exp(G_C) S_0 + (exp(G_C - G) K)^T U``;
only these cheap matmuls run inside the ``lax.scan`` over chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import round_up
from pallas_kernels.linear_scan import chunked as cu

__all__ = ["gated_delta_rule_step", "gated_delta_rule_reference", "gdn_chunked", "l2_normalize"]

L2_EPS = 1e-6


def l2_normalize(x):
    """``x / sqrt(sum(x**2, -1) + 1e-6)`` in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def _prep_qk(q, k, use_qk_l2norm):
    if use_qk_l2norm:
        return l2_normalize(q), l2_normalize(k)
    return q.astype(jnp.float32), k.astype(jnp.float32)


def _step_f32(state, q_t, k_t, v_t, g_t, b_t):
    """q_t already normalised and scaled. state [B, H, Dk, Dv]; q_t, k_t [B, H, Dk]; g_t, b_t [B, H]."""
    state = jnp.exp(g_t)[..., None, None] * state
    u_t = b_t[..., None] * (v_t - jnp.einsum("bhde,bhd->bhe", state, k_t))
    state = state + k_t[..., :, None] * u_t[..., None, :]
    return jnp.einsum("bhde,bhd->bhe", state, q_t), state


def gated_delta_rule_step(
    q_t, k_t, v_t, log_decay_t, beta_t, state, *, scale: float | None = None, use_qk_l2norm: bool = False
):
    """One decoding step.

    Args:
      q_t, k_t: ``[batch, heads, key_dim]``; v_t: ``[batch, heads, value_dim]``; log_decay_t, beta_t:
        ``[batch, heads]``; state: ``[batch, heads, key_dim, value_dim]``.
    Returns:
      ``(o_t [batch, heads, value_dim] in q's dtype, new_state float32)``.
    """
    want = q_t.shape + (v_t.shape[-1],)
    if state.shape != want:
        raise ValueError(f"gated_delta_rule_step: state must be {want}, got {state.shape}")
    qf, kf = _prep_qk(q_t, k_t, use_qk_l2norm)
    f = lambda a: a.astype(jnp.float32)
    o, s = _step_f32(f(state), qf * cu.query_scale(scale, q_t.shape[-1]), kf, f(v_t), f(log_decay_t), f(beta_t))
    return o.astype(q_t.dtype), s


def _init_state(initial_state, b, h, dk, dv):
    if initial_state is None:
        return jnp.zeros((b, h, dk, dv), jnp.float32)
    return initial_state.astype(jnp.float32)


def gated_delta_rule_reference(q, k, v, log_decay, beta, *, scale=None, initial_state=None, use_qk_l2norm=False):
    """Token-by-token ``lax.scan``. Same arguments/returns as ``api.gated_delta_rule``."""
    b, _, h, dk = q.shape
    qf, kf = _prep_qk(q, k, use_qk_l2norm)
    qf = qf * cu.query_scale(scale, dk)
    xs = tuple(jnp.moveaxis(a.astype(jnp.float32), 1, 0) for a in (qf, kf, v, log_decay, beta))

    def body(state, inp):
        o_t, state = _step_f32(state, *inp)
        return state, o_t

    final, o = jax.lax.scan(body, _init_state(initial_state, b, h, dk, v.shape[-1]), xs)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), final


def _unit_lower_inverse(strict):
    """``(I + strict)^{-1}`` for strictly lower-triangular ``strict: [..., n, n]``, by forward substitution.

    Row ``i`` of the inverse is ``e_i - strict[i, :] @ inv`` (rows ``>= i`` of ``inv`` still hold the identity and
    ``strict[i, j>=i] = 0``, so only the finished rows contribute); a ``fori_loop`` of batched mat-vecs. XLA's batched
    triangular solve on CPU was an order of magnitude slower inside the chunked GDN graph.
    """
    n = strict.shape[-1]

    def body(i, inv):
        row = jax.lax.dynamic_index_in_dim(strict, i, axis=strict.ndim - 2, keepdims=False)  # [..., n]
        new = jax.nn.one_hot(i, n, dtype=strict.dtype) - jnp.einsum("...j,...jk->...k", row, inv)
        return jax.lax.dynamic_update_index_in_dim(inv, new, i, axis=strict.ndim - 2)

    eye = jnp.broadcast_to(jnp.eye(n, dtype=strict.dtype), strict.shape)
    return jax.lax.fori_loop(1, n, body, eye)


@jax.custom_vjp
def _solve_unit_lower(strict, rhs):
    """``X = (I + strict)^{-1} rhs``; ``strict: [..., n, n]`` strictly lower, ``rhs: [..., n, m]``."""
    return jnp.einsum("...ij,...jm->...im", _unit_lower_inverse(strict), rhs)


def _solve_fwd(strict, rhs):
    inv = _unit_lower_inverse(strict)
    x = jnp.einsum("...ij,...jm->...im", inv, rhs)
    return x, (inv, x)


def _solve_bwd(res, dx):
    # X = M^-1 R with M = I + strict:  dR = M^-T dX,  dM = -dR X^T (only the strictly lower entries are free)
    inv, x = res
    d_rhs = jnp.einsum("...ji,...jm->...im", inv, dx)
    n = inv.shape[-1]
    d_strict = -jnp.einsum("...im,...jm->...ij", d_rhs, x) * jnp.tril(jnp.ones((n, n), inv.dtype), -1)
    return d_strict, d_rhs


_solve_unit_lower.defvjp(_solve_fwd, _solve_bwd)


def gdn_chunked(q, k, v, log_decay, beta, scale, initial_state, use_qk_l2norm, chunk_size):
    bsz, t, h, dk = q.shape
    dv = v.shape[-1]
    c = cu.effective_chunk(t, chunk_size)
    tp = round_up(t, c)
    qf, kf = _prep_qk(q, k, use_qk_l2norm)
    # Padded steps: log-decay 0 and beta 0 make them identity transitions.
    qc, kc, vc = (cu.to_chunks(cu.pad_time(a.astype(jnp.float32), tp), c) for a in (qf, kf, v))
    gc, bc = (cu.to_chunks(cu.pad_time(a.astype(jnp.float32), tp), c) for a in (log_decay, beta))  # [B,H,N,C]
    qc = qc * cu.query_scale(scale, dk)
    gcum = jnp.cumsum(gc, axis=-1)  # [B, H, N, C]
    diff = gcum[..., :, None] - gcum[..., None, :]
    decay = cu.masked_exp(diff, cu.causal_mask(c))  # D_ts, zero above the diagonal

    kk = jnp.einsum("...td,...sd->...ts", kc, kc)
    lower = bc[..., :, None] * decay * kk * cu.causal_mask(c, strict=True)
    rhs = jnp.concatenate([bc[..., None] * vc, (bc * jnp.exp(gcum))[..., None] * kc], axis=-1)
    sol = _solve_unit_lower(lower, rhs)
    u_tilde, w = sol[..., :dv], sol[..., dv:]  # [.., C, Dv], [.., C, Dk]

    attn = jnp.einsum("...td,...sd->...ts", qc, kc) * decay  # s <= t (decay is masked)
    q_dec = qc * jnp.exp(gcum)[..., None]
    g_last = gcum[..., -1]  # [B, H, N]
    k_end = kc * jnp.exp(g_last[..., None] - gcum)[..., None]  # exponent <= 0

    def body(state, inp):
        u_t, w_c, a_c, qd, ke, gl = inp
        u = u_t - jnp.einsum("...cd,...de->...ce", w_c, state)
        o = jnp.einsum("...cd,...de->...ce", qd, state) + jnp.einsum("...ts,...se->...te", a_c, u)
        state = jnp.exp(gl)[..., None, None] * state + jnp.einsum("...cd,...ce->...de", ke, u)
        return state, o

    xs = tuple(jnp.moveaxis(a, 2, 0) for a in (u_tilde, w, attn, q_dec, k_end, g_last))
    final, o = jax.lax.scan(body, _init_state(initial_state, bsz, h, dk, dv), xs)
    return cu.from_chunks(jnp.moveaxis(o, 0, 2), t).astype(q.dtype), final
