"""Token-level cross-entropy with optional z-loss (SPEC A.2)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cross_entropy", "Z_LOSS_MODES"]

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
        raise ValueError(f"cross_entropy: logits must be [batch, time, vocab] and targets [batch, time]; "
                         f"got {logits.shape} and {targets.shape}")
    if loss_mask is not None and loss_mask.shape != targets.shape:
        raise ValueError(f"cross_entropy: loss_mask must be [batch, time]={targets.shape}, got {loss_mask.shape}")
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
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
