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
    ``[batch, time, heads, head_dim]``; the other channels pass through. Float32 rotation, result in ``x.dtype``.

    Computed on whole heads as ``x * C + (x @ P) * S``: ``C``/``S`` are the tables spread over ``head_dim`` and ``P``
    the 0/1 matrix that moves each channel to its pair partner (an exact permutation). No array narrower than a head
    is formed, in the rotation or its gradient: TPU pads every minor dimension to 128 lanes, so the 8-channel halves of
    a partial RoPE (``rope_dim`` 16) took 16x their size, about 1 GiB per chip for ``llama_canon_1b`` on v5e-256.
    """
    half = cos.shape[-1]
    rope_dim, head_dim = 2 * half, x.shape[-1]
    ch = np.arange(head_dim)
    rotated = ch < rope_dim
    if version == "huggingface":  # channel i pairs with i + half
        first, pair, partner = ch < half, ch % max(half, 1), np.where(ch < half, ch + half, ch - half)
    else:  # channel 2i pairs with 2i + 1
        first, pair, partner = ch % 2 == 0, ch // 2, ch ^ 1
    perm = np.zeros((head_dim, head_dim), np.float32)
    perm[partner[rotated], ch[rotated]] = 1.0  # (x @ perm)[..., e] = x[..., partner[e]] for rotated channels e
    pair = np.where(rotated, pair, 0)
    cos_w = jnp.where(rotated, jnp.take(cos, pair, axis=-1), 1.0)[:, :, None, :]
    sin_w = jnp.where(rotated, jnp.where(first, -1.0, 1.0) * jnp.take(sin, pair, axis=-1), 0.0)[:, :, None, :]
    moved = jnp.einsum(
        "bthd,de->bthe",
        x,
        jnp.asarray(perm, x.dtype),
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    )
    xf = x.astype(jnp.float32)
    return jnp.where(rotated, xf * cos_w + moved * sin_w, xf).astype(x.dtype)


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
