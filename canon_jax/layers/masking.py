"""Token masking: a masked token (``token_mask`` False, e.g. left padding) must not influence any later token.

Every layer that mixes tokens zeroes its inputs at masked positions with :func:`mask_tokens` before mixing them (the
Canon convolutions, and the gates and inputs of the linear recurrences, where a zero means an identity transition).
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["mask_tokens"]


def mask_tokens(x, token_mask):
    """Zeroes ``x: [batch, time, ...]`` where ``token_mask: [batch, time]`` is False (None = all valid).

    A select rather than a product, so that non-finite values at masked positions are dropped as well.
    """
    if token_mask is None:
        return x
    if token_mask.ndim != 2:
        raise ValueError(f"mask_tokens: token_mask must be [batch, time], got shape {token_mask.shape}")
    m = token_mask.reshape(token_mask.shape + (1,) * (x.ndim - 2))
    return jnp.where(m, x, jnp.zeros((), x.dtype))
