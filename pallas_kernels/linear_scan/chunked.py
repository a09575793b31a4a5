"""Helpers shared by the chunked XLA forms of the linear recurrences (``gla_xla``, ``gdn_xla``, ``ssd_xla``).

The chunked forms cut time into chunks of ``C`` tokens, do all work *inside* a chunk in parallel with matmuls and
carry the recurrent state from chunk to chunk with ``lax.scan``. Any ``T`` works: inputs are padded at the end with
steps whose transition is the identity (gate 0 in log space, zero key/value), so outputs and the final state are
exact.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import round_up


def query_scale(scale, dk: int):
    """The query scale: ``scale``, default ``dk ** -0.5``."""
    return dk**-0.5 if scale is None else scale


def effective_chunk(t: int, chunk_size: int, multiple: int = 1) -> int:
    """The chunk actually used: ``chunk_size``, or less for short inputs (no point padding 1 token to 256)."""
    return min(chunk_size, round_up(max(t, 1), multiple))


def pad_time(x, t_padded: int):
    """Zero-pads axis 1 (time) of ``x`` up to ``t_padded``."""
    extra = t_padded - x.shape[1]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths)


def to_chunks(x, chunk: int):
    """``[batch, time, heads, *rest]`` -> ``[batch, heads, n_chunks, chunk, *rest]`` (time must be a multiple)."""
    b, t, h = x.shape[:3]
    x = x.reshape((b, t // chunk, chunk, h) + x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def from_chunks(x, t: int):
    """Inverse of :func:`to_chunks`, cropped to the first ``t`` steps: ``[batch, time, heads, *rest]``."""
    b, h, n, c = x.shape[:4]
    x = jnp.moveaxis(x, 1, 3)
    return x.reshape((b, n * c, h) + x.shape[4:])[:, :t]


def causal_mask(c: int, strict: bool = False):
    """``[c, c]`` bool, ``mask[t, s]`` true when ``s <= t`` (``s < t`` if strict)."""
    i = jnp.arange(c)
    return (i[None, :] < i[:, None]) if strict else (i[None, :] <= i[:, None])


def masked_exp(diff, mask):
    """``exp(diff)`` where ``mask`` else 0; masking happens *before* the exponential so that the (positive) exponents
    of the discarded entries never produce inf (whose gradient would be nan)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)
