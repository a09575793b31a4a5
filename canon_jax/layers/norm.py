"""RMSNorm: ``x * rsqrt(mean(x^2) + eps) * weight``, computed in float32."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["RMSNorm", "rms_norm"]


def rms_norm(x, weight, eps: float, *, out_dtype=None):
    """``x: [..., d]``, ``weight: [d]`` -> ``[..., d]``; statistics and product in float32.

    The result is in ``out_dtype`` (default ``x.dtype``); the linear mixers keep it in float32 to multiply it with
    their output gate before the cast.
    """
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * weight.astype(jnp.float32)
    return y.astype(x.dtype if out_dtype is None else out_dtype)


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis of ``x: [..., d]`` with a learnable ``scale: [d]`` (initialised to 1).

    ``axis_name`` is the logical axis of the scale (``embed`` for block norms, ``heads``/``kv_heads`` for QK-norm).
    """

    eps: float = 1e-5
    axis_name: str = "embed"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return rms_norm(x, scale, self.eps)
