"""Rotary position embeddings: full, partial (``rope_dim`` < head_dim) or none (``rope_dim = 0``), SPEC A.2.

Two pairings of the rotated channels are supported:

* ``"huggingface"`` (rotate-half): channel ``i`` is paired with ``i + rope_dim/2``.
* ``"lingua"`` (interleaved): channel ``2i`` is paired with ``2i + 1``.

Pair ``i`` rotates by ``position * theta^(-2i/rope_dim)`` in both cases; channels ``>= rope_dim`` pass through.
"""
from __future__ import annotations

import jax.numpy as jnp

__all__ = ["rope_inv_freq", "apply_rope", "ROPE_VERSIONS"]

ROPE_VERSIONS = ("huggingface", "lingua")


def rope_inv_freq(rope_dim: int, theta: float):
    """``[rope_dim // 2]`` float32 inverse frequencies ``theta^(-2i/rope_dim)``."""
    return 1.0 / (theta ** (jnp.arange(0, rope_dim, 2, dtype=jnp.float32) / rope_dim))


def apply_rope(x, positions, *, rope_dim: int, theta: float = 10000.0, version: str = "huggingface"):
    """Rotates the first ``rope_dim`` channels of every head.

    Args:
      x: ``[batch, time, heads, head_dim]``.
      positions: int ``[batch, time]`` (absolute position of each token).
      rope_dim: even number of rotated channels, ``0 <= rope_dim <= head_dim`` (0 = NoPE: ``x`` is returned as is).
      theta: RoPE base.
      version: ``"huggingface"`` or ``"lingua"`` pairing.
    Returns:
      ``[batch, time, heads, head_dim]`` in ``x.dtype`` (angles and rotation in float32).
    """
    if version not in ROPE_VERSIONS:
        raise ValueError(f"apply_rope: version must be one of {ROPE_VERSIONS}, got {version!r}")
    head_dim = x.shape[-1]
    if rope_dim < 0 or rope_dim % 2 or rope_dim > head_dim:
        raise ValueError(f"apply_rope: rope_dim must be even and in [0, head_dim={head_dim}], got {rope_dim}")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"apply_rope: positions must be [batch, time]={x.shape[:2]}, got {positions.shape}")
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    angles = positions.astype(jnp.float32)[:, :, None] * rope_inv_freq(rope_dim, theta)  # [B, T, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    rot = x[..., :rope_dim].astype(jnp.float32)
    if version == "huggingface":
        a, b = rot[..., :half], rot[..., half:]
        out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    else:
        pairs = rot.reshape(rot.shape[:-1] + (half, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rot.shape)
    out = out.astype(x.dtype)
    if rope_dim == head_dim:
        return out
    return jnp.concatenate([out, x[..., rope_dim:]], axis=-1)
