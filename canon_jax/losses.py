"""Token-level cross-entropy with optional z-loss (docs/models.md, "Loss").

:func:`cross_entropy` takes materialised logits. :func:`chunked_cross_entropy` takes the final hidden states and the
head weight instead and computes the head matmul, log-sum-exp and target logit a chunk of time steps at a time, so
the float32 ``[batch, time, vocab]`` logits (and their gradient) never exist at once: at 4 x 4096 tokens and a
32000-token vocabulary they alone are 2 GiB per device, three times over in the backward.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["cross_entropy", "chunked_cross_entropy", "Z_LOSS_MODES", "HEAD_LAYOUTS"]

Z_LOSS_MODES = ("none", "official", "palm")


def cross_entropy(logits, targets, loss_mask=None, *, z_loss: str = "none", z_loss_weight: float = 1e-4):
    """Masked mean next-token cross-entropy.

    Args:
      logits: ``[batch, time, vocab]`` (any float dtype; the log-softmax is taken in float32).
      targets: int ``[batch, time]``.
      loss_mask: optional ``[batch, time]`` weights (1 = supervised target); None = every token.
      z_loss: ``"none"``; ``"official"`` = per-token ``l + w * l^2`` (what the released lingua code computes);
        ``"palm"`` = per-token ``l + w * logZ^2``.
      z_loss_weight: ``w``.
    Returns:
      ``(loss, aux)``: scalar float32 masked mean of the per-token objective; ``aux`` holds the scalars ``nll``
      (masked mean NLL without the z term), ``z_loss`` (masked mean of the added term), ``num_tokens`` (mask sum)
      and the per-token ``token_nll`` ``[batch, time]``.
    """
    if z_loss not in Z_LOSS_MODES:
        raise ValueError(f"cross_entropy: z_loss must be one of {Z_LOSS_MODES}, got {z_loss!r}")
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"cross_entropy: logits must be [batch, time, vocab] and targets [batch, time]; "
            f"got {logits.shape} and {targets.shape}"
        )
    if loss_mask is not None and loss_mask.shape != targets.shape:
        raise ValueError(f"cross_entropy: loss_mask must be [batch, time]={targets.shape}, got {loss_mask.shape}")
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return _objective(log_z, target_logit, loss_mask, z_loss, z_loss_weight)


def _objective(log_z, target_logit, loss_mask, z_loss, z_loss_weight):
    """The masked means of :func:`cross_entropy` from the per-token ``log Z`` and target logit (float32)."""
    nll = log_z - target_logit
    if z_loss == "official":
        extra = z_loss_weight * nll * nll
    elif z_loss == "palm":
        extra = z_loss_weight * log_z * log_z
    else:
        extra = jnp.zeros_like(nll)
    mask = jnp.ones_like(nll) if loss_mask is None else loss_mask.astype(jnp.float32)
    n = jnp.sum(mask)
    denom = jnp.maximum(n, 1.0)  # an all-masked batch gives loss 0, not NaN
    mean_nll = jnp.sum(nll * mask) / denom
    mean_extra = jnp.sum(extra * mask) / denom
    aux = {"nll": mean_nll, "z_loss": mean_extra, "num_tokens": n, "token_nll": nll}
    return mean_nll + mean_extra, aux


HEAD_LAYOUTS = ("dv", "vd")


def chunked_cross_entropy(
    hidden,
    head,
    targets,
    loss_mask=None,
    *,
    head_layout: str = "dv",
    chunk_size: int = 512,
    compute_dtype=None,
    z_loss: str = "none",
    z_loss_weight: float = 1e-4,
):
    """:func:`cross_entropy` of ``logits = hidden @ head`` without materialising the logits.

    Args:
      hidden: ``[batch, time, d]`` final hidden states (after the final norm).
      head: the LM head, ``[d, vocab]`` (``head_layout="dv"``: an untied head's kernel) or ``[vocab, d]``
        (``"vd"``: the embedding table of a tied head).
      targets, loss_mask, z_loss, z_loss_weight: as in :func:`cross_entropy`.
      chunk_size: time steps per chunk; each chunk's ``[batch, chunk, vocab]`` float32 logits are recomputed in the
        backward (one extra head matmul) instead of being kept.
      compute_dtype: dtype of the matmul operands (default: ``hidden``'s); products accumulate in float32.
    Returns:
      ``(loss, aux)`` exactly as :func:`cross_entropy` on the float32 logits ``hidden @ head``.
    """
    if z_loss not in Z_LOSS_MODES:
        raise ValueError(f"chunked_cross_entropy: z_loss must be one of {Z_LOSS_MODES}, got {z_loss!r}")
    if head_layout not in HEAD_LAYOUTS:
        raise ValueError(f"chunked_cross_entropy: head_layout must be one of {HEAD_LAYOUTS}, got {head_layout!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be a positive integer, got {chunk_size!r}")
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(
            f"chunked_cross_entropy: hidden must be [batch, time, d] and targets [batch, time]; "
            f"got {hidden.shape} and {targets.shape}"
        )
    d = hidden.shape[-1]
    if head.ndim != 2 or head.shape[0 if head_layout == "dv" else 1] != d:
        want = "[d, vocab]" if head_layout == "dv" else "[vocab, d]"
        raise ValueError(
            f"chunked_cross_entropy: head must be {want} with d={d} for head_layout={head_layout!r}, got {head.shape}"
        )
    if loss_mask is not None and loss_mask.shape != targets.shape:
        raise ValueError(
            f"chunked_cross_entropy: loss_mask must be [batch, time]={targets.shape}, got {loss_mask.shape}"
        )
    cdt = jnp.dtype(hidden.dtype if compute_dtype is None else compute_dtype)
    t = hidden.shape[1]
    chunk = min(chunk_size, t)
    pad = -t % chunk
    h, tg = hidden, targets.astype(jnp.int32)
    if pad:  # padded steps get target 0 and are sliced off before the mask is applied
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        tg = jnp.pad(tg, ((0, 0), (0, pad)))
    # Gather the head over the FSDP axis once, not once per chunk (no-op without logical-axis rules).
    head = nn.with_logical_constraint(head, (None, "vocab") if head_layout == "dv" else ("vocab", None))
    log_z, target_logit = _lse_and_target(h, head, tg, chunk, head_layout, cdt)
    if pad:
        log_z, target_logit = log_z[:, :t], target_logit[:, :t]
    return _objective(log_z, target_logit, loss_mask, z_loss, z_loss_weight)


def _chunk_logits(h, head, layout, cdt):
    """float32 ``[batch, chunk, vocab]`` logits of one chunk."""
    dims = (((2,), (0,)), ((), ())) if layout == "dv" else (((2,), (1,)), ((), ()))
    return jax.lax.dot_general(h.astype(cdt), head.astype(cdt), dims, preferred_element_type=jnp.float32)


def _chunks(x, i, chunk):
    return jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _lse_and_target(h, head, targets, chunk, layout, cdt):
    return _lse_and_target_fwd(h, head, targets, chunk, layout, cdt)[0]


def _lse_and_target_fwd(h, head, targets, chunk, layout, cdt):
    b, t, _ = h.shape

    def body(i, carry):
        lz, tl = carry
        logits = _chunk_logits(_chunks(h, i, chunk), head, layout, cdt)
        tg = _chunks(targets, i, chunk)
        lz = jax.lax.dynamic_update_slice_in_dim(lz, jax.nn.logsumexp(logits, axis=-1), i * chunk, axis=1)
        tl = jax.lax.dynamic_update_slice_in_dim(
            tl, jnp.take_along_axis(logits, tg[..., None], axis=-1)[..., 0], i * chunk, axis=1
        )
        return lz, tl

    zeros = jnp.zeros((b, t), jnp.float32)
    log_z, target_logit = jax.lax.fori_loop(0, t // chunk, body, (zeros, zeros))
    return (log_z, target_logit), (h, head, targets, log_z)


def _lse_and_target_bwd(chunk, layout, cdt, res, cts):
    """``dlogits = g_logz * softmax + g_target * onehot``, recomputing each chunk's logits from ``h`` and ``log Z``."""
    h, head, targets, log_z = res
    g_lz, g_tl = (jnp.asarray(c, jnp.float32) for c in cts)
    dh_dims = (((2,), (1,)), ((), ())) if layout == "dv" else (((2,), (0,)), ((), ()))

    def body(i, carry):
        dh, dhead = carry
        hc = _chunks(h, i, chunk)
        logits = _chunk_logits(hc, head, layout, cdt)
        lz, tg = _chunks(log_z, i, chunk), _chunks(targets, i, chunk)
        onehot = tg[..., None] == jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
        dlogits = (
            _chunks(g_lz, i, chunk)[..., None] * jnp.exp(logits - lz[..., None])
            + jnp.where(onehot, _chunks(g_tl, i, chunk)[..., None], 0.0)
        ).astype(cdt)
        dhc = jax.lax.dot_general(dlogits, head.astype(cdt), dh_dims, preferred_element_type=jnp.float32)
        dh = jax.lax.dynamic_update_slice_in_dim(dh, dhc.astype(dh.dtype), i * chunk, axis=1)
        # weight gradient: contract batch and time; accumulate in float32 across chunks
        if layout == "dv":
            dw = jax.lax.dot_general(
                hc.astype(cdt), dlogits, (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32
            )
        else:
            dw = jax.lax.dot_general(
                dlogits, hc.astype(cdt), (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32
            )
        return dh, dhead + dw

    init = (jnp.zeros(h.shape, h.dtype), jnp.zeros(head.shape, jnp.float32))
    dh, dhead = jax.lax.fori_loop(0, h.shape[1] // chunk, body, init)
    return dh, dhead.astype(head.dtype), None


_lse_and_target.defvjp(_lse_and_target_fwd, _lse_and_target_bwd)
