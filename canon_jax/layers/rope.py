"""Rotary position embeddings: full, partial (``rope_dim`` < head_dim) or none (``rope_dim = 0``).

Two pairings of the rotated channels are supported:

* ``"huggingface"`` (rotate-half): channel ``i`` is paired with ``i + rope_dim/2``.
* ``"lingua"`` (interleaved): channel ``2i`` is paired with ``2i + 1``.

Pair ``i`` rotates by ``position * theta^(-2i/rope_dim)`` in both cases; channels ``>= rope_dim`` pass through.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["rope_inv_freq", "rope_tables", "default_rope_tables", "rotate", "apply_rope", "ROPE_VERSIONS"]

ROPE_VERSIONS = ("huggingface", "lingua")


def rope_inv_freq(rope_dim: int, theta: float):
    """``[rope_dim // 2]`` float32 inverse frequencies ``theta^(-2i/rope_dim)`` (a host constant, numpy)."""
    return (1.0 / (np.float32(theta) ** (np.arange(0, rope_dim, 2, dtype=np.float32) / np.float32(rope_dim)))).astype(
        np.float32
    )


def rope_tables(positions, rope_dim: int, theta: float = 10000.0):
    """``(cos, sin)``, each float32 ``[P, time, rope_dim // 2]``, for int ``positions`` ``[P, time]``.

    ``P`` is the batch size, or 1 when every sequence has the same positions (then the tables are computed once, not
    per sequence). The optimisation barrier asks XLA to materialise them rather than re-evaluate cos/sin for every
    head and channel inside the rotation; XLA:CPU drops it, see :func:`default_rope_tables` for positions 0..T-1.
    """
    angles = positions.astype(jnp.float32)[:, :, None] * rope_inv_freq(rope_dim, theta)
    return jax.lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))


_CONST_TABLE_LIMIT = 1 << 20  # elements per table; larger default tables are computed in the program


@functools.lru_cache(maxsize=64)
def _arange_tables(t: int, rope_dim: int, theta: float):
    angles = np.arange(t, dtype=np.float32)[:, None] * rope_inv_freq(rope_dim, theta)
    angles = angles.astype(np.float64)  # the float32 angles of rope_tables, then correctly rounded cos/sin
    return np.cos(angles).astype(np.float32)[None], np.sin(angles).astype(np.float32)[None]


def default_rope_tables(t: int, rope_dim: int, theta: float = 10000.0):
    """``rope_tables`` for positions ``0..t-1`` shared by every sequence, ``[1, t, rope_dim // 2]`` each.

    Computed once on the host and embedded in the program as constants (up to 2^20 elements per table; beyond that
    as :func:`rope_tables` of an iota): XLA:CPU otherwise fuses cos/sin into the rotation of every layer (the
    optimisation barrier in :func:`rope_tables` does not survive its pipeline), and evaluating them per element made
    RoPE ~15x a copy of q.
    """
    if t * (rope_dim // 2) > _CONST_TABLE_LIMIT:
        return rope_tables(jnp.arange(t, dtype=jnp.int32)[None], rope_dim, theta)
    cos, sin = _arange_tables(int(t), int(rope_dim), float(theta))
    return jnp.asarray(cos), jnp.asarray(sin)


def rotate(x, cos, sin, *, version: str = "huggingface"):
    """Applies the rotation of :func:`rope_tables` to the first ``2 * cos.shape[-1]`` channels of every head of ``x``
    ``[batch, time, heads, head_dim]``; the other channels pass through. Float32 rotation, result in ``x.dtype``."""
    half = cos.shape[-1]
    rope_dim = 2 * half
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot = x[..., :rope_dim].astype(jnp.float32)
    if version == "huggingface":
        a, b = rot[..., :half], rot[..., half:]
        out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    else:
        pairs = rot.reshape(rot.shape[:-1] + (half, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rot.shape)
    out = out.astype(x.dtype)
    if rope_dim == x.shape[-1]:
        return out
    return jnp.concatenate([out, x[..., rope_dim:]], axis=-1)


def apply_rope(x, positions, *, rope_dim: int, theta: float = 10000.0, version: str = "huggingface", tables=None):
    """Rotates the first ``rope_dim`` channels of every head.

    Args:
      x: ``[batch, time, heads, head_dim]``.
      positions: int ``[batch, time]`` (absolute position of each token), or ``[1, time]`` when all sequences share
        them.
      rope_dim: even number of rotated channels, ``0 <= rope_dim <= head_dim`` (0 = NoPE: ``x`` is returned as is).
      theta: RoPE base.
      version: ``"huggingface"`` or ``"lingua"`` pairing.
      tables: optional ``rope_tables(positions, rope_dim, theta)``, to share them between q and k.
    Returns:
      ``[batch, time, heads, head_dim]`` in ``x.dtype`` (angles and rotation in float32).
    """
    if version not in ROPE_VERSIONS:
        raise ValueError(f"apply_rope: version must be one of {ROPE_VERSIONS}, got {version!r}")
    head_dim = x.shape[-1]
    if rope_dim < 0 or rope_dim % 2 or rope_dim > head_dim:
        raise ValueError(f"apply_rope: rope_dim must be even and in [0, head_dim={head_dim}], got {rope_dim}")
    if positions.ndim != 2 or positions.shape[1] != x.shape[1] or positions.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"apply_rope: positions must be [batch, time]={x.shape[:2]} or [1, {x.shape[1]}], got {positions.shape}"
        )
    if rope_dim == 0:
        return x
    cos, sin = rope_tables(positions, rope_dim, theta) if tables is None else tables
    if cos.shape != (positions.shape[0], x.shape[1], rope_dim // 2):
        raise ValueError(
            f"apply_rope: tables must be [{positions.shape[0]}, {x.shape[1]}, {rope_dim // 2}], got {cos.shape}"
        )
    return rotate(x, cos, sin, version=version)
