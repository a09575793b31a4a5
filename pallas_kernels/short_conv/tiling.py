"""Block specs shared by the Mosaic TPU and Mosaic GPU short-conv kernels.

Grid ``(batch, channel_block, time_block)``: each step reads its ``[bt, bd]`` tile of ``x`` plus an ``hrows``-row halo
block of the same array, just before the tile (causal forward) or just after it (anti-causal backward), and the first
tile optionally its halo from ``halo0`` (the initial state).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl


def tile_and_halo_specs(x, bt: int, bd: int, hrows: int, direction: str, halo0=None):
    """Returns ``(in_specs, args, tile, nt, nd, r)`` for ``x: [B, Tp, Dp]`` (Tp, Dp multiples of ``bt``, ``bd``).

    ``tile`` is the tile spec and ``r = bt // hrows`` the number of halo blocks per tile."""
    _, tp, dp = x.shape
    nt, nd = tp // bt, dp // bd
    r = bt // hrows
    tile = pl.BlockSpec((None, bt, bd), lambda b, d, t: (b, t, d))
    if direction == "causal":
        halo_idx = lambda b, d, t: (b, jnp.maximum(t * r - 1, 0), d)
    else:
        halo_idx = lambda b, d, t: (b, jnp.minimum((t + 1) * r, nt * r - 1), d)
    in_specs = [tile, pl.BlockSpec((None, hrows, bd), halo_idx)]
    args = [x, x]
    if halo0 is not None:
        in_specs.append(pl.BlockSpec((None, hrows, bd), lambda b, d, t: (b, 0, d)))
        args.append(halo0)
    return in_specs, args, tile, nt, nd, r
