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


def stage_tile_and_halo(buf, x, halo_ref, halo0_ref, *, direction: str, hrows: int, bt: int, nt: int):
    """Writes the float32 tile ``x [bt, bd]`` and its halo into ``buf [bt + hrows, bd]``: the halo rows before the
    tile (causal) or after it (anti-causal); at the sequence edge the rows of ``halo0_ref`` (the initial state, or
    None for zeros). Returns the row of ``buf`` where the tile starts: tap ``s`` is the ``bt``-row window ``s`` rows
    before it (causal) or after it (anti-causal)."""
    t = pl.program_id(2)
    bd = buf.shape[-1]
    if direction == "causal":
        main, halo_at, edge = hrows, 0, t == 0
    else:
        main, halo_at, edge = 0, bt, t == nt - 1
    buf[pl.ds(main, bt), :] = x

    @pl.when(edge)
    def _():
        if halo0_ref is not None:
            buf[pl.ds(halo_at, hrows), :] = halo0_ref[...].astype(jnp.float32)
        else:
            buf[pl.ds(halo_at, hrows), :] = jnp.zeros((hrows, bd), jnp.float32)

    @pl.when(jnp.logical_not(edge))
    def _():
        buf[pl.ds(halo_at, hrows), :] = halo_ref[...].astype(jnp.float32)

    return main
