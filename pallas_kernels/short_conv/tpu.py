"""Mosaic TPU kernel for the short conv: one tile ``[block_t, block_d]`` per grid step, halo from a second BlockSpec.

Grid ``(batch, channel_block, time_block)``, all "parallel" (megacore can split any axis): instead of carrying
the K-1 history across a sequential time axis, each step also DMAs the ``hrows``-row block that touches its tile
(the previous one for the causal forward, the next one for the anti-causal backward). ``hrows`` is one sublane
tile (8 rows for 32-bit, 16 for 16-bit), so the halo costs ``hrows / block_t`` extra reads (3 % at the defaults).
The tile and its halo are written into one float32 VMEM buffer; tap ``s`` is a (sublane-unaligned) window of it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import tpu_params
from pallas_kernels.cost import conv_cost
from pallas_kernels.short_conv.tiling import stage_tile_and_halo, tile_and_halo_specs


def _kernel(
    *refs,
    k,
    hrows,
    bt,
    direction,
    nt,
    has_halo0,
    has_bias,
    has_bits,
    has_extra,
    activation,
    residual_x,
    with_dw=False,
    dw_has_halo0=False,
    dw_has_bits=False,
):
    it = iter(refs)
    x_ref, halo_ref = next(it), next(it)
    halo0_ref = next(it) if has_halo0 else None
    w_ref = next(it)
    bias_ref = next(it) if has_bias else None
    bits_ref = next(it) if has_bits else None
    extra_ref = next(it) if has_extra else None
    if with_dw:
        dx_ref, dhalo_ref = next(it), next(it)
        dhalo0_ref = next(it) if dw_has_halo0 else None
        dbits_ref = next(it) if dw_has_bits else None
    o_ref = next(it)
    dw_ref = next(it) if with_dw else None
    buf = next(it)
    xbuf = next(it) if with_dw else None
    bd = x_ref.shape[-1]
    x = x_ref[...].astype(jnp.float32)
    main = stage_tile_and_halo(buf, x, halo_ref, halo0_ref, direction=direction, hrows=hrows, bt=bt, nt=nt)
    bits = bits_ref[...] if has_bits else None
    acc = jnp.zeros((bt, bd), jnp.float32)
    for s in range(k):  # tap s reads s tokens back (causal) or ahead (anti-causal) with weight row K-1-s
        start = main - s if direction == "causal" else s
        tap = buf[pl.ds(start, bt), :]
        if has_bits and s > 0:
            tap = jnp.where(((bits >> s) & 1) == 1, tap, 0.0)
        acc = acc + tap * w_ref[pl.ds(k - 1 - s, 1), :]
    if has_bias:
        acc = acc + bias_ref[...]
    if activation == "silu":
        acc = acc * jax.nn.sigmoid(acc)
    if residual_x:
        acc = acc + x
    if has_extra:
        acc = acc + extra_ref[...].astype(jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)
    if with_dw:
        _partial_weight_grad(x, dx_ref, dhalo_ref, dhalo0_ref, dbits_ref, dw_ref, xbuf, k=k, hrows=hrows, bt=bt)


def _partial_weight_grad(g, x_ref, halo_ref, halo0_ref, bits_ref, dw_ref, xbuf, *, k, hrows, bt):
    """Rows ``K-1-s`` of this tile's ``sum_t g[t] x[t-s]`` (causal taps of the forward input) and row K = sum_t g[t]
    (the bias gradient): the backward's reductions, computed while the ``g`` tile is in VMEM."""
    x = x_ref[...].astype(jnp.float32)
    stage_tile_and_halo(xbuf, x, halo_ref, halo0_ref, direction="causal", hrows=hrows, bt=bt, nt=None)
    bits = bits_ref[...] if bits_ref is not None else None
    for s in range(k):
        tap = xbuf[pl.ds(hrows - s, bt), :]
        if bits is not None and s > 0:
            tap = jnp.where(((bits >> s) & 1) == 1, tap, 0.0)
        dw_ref[pl.ds(k - 1 - s, 1), :] = jnp.sum(g * tap, axis=0, keepdims=True)
    dw_ref[pl.ds(k, 1), :] = jnp.sum(g, axis=0, keepdims=True)


def conv_call(
    x,
    w,
    *,
    halo0,
    bias,
    bits,
    extra,
    direction,
    activation,
    residual_x,
    out_dtype,
    bt,
    bd,
    hrows,
    interpret,
    dw_x=None,
    dw_halo0=None,
    dw_bits=None,
):
    """Tiled short conv on padded inputs.

    Args:
      x: ``[B, Tp, Dp]`` with ``Tp % bt == 0``, ``Dp % bd == 0``, ``bt % hrows == 0``.
      w: ``[K, Dp]`` float32; row ``K-1-s`` weighs the tap ``s`` tokens away.
      halo0: ``[B, hrows, Dp]`` rows before the sequence (causal only; ``None`` = zeros).
      bias: ``[1, Dp]`` float32 or None. bits: ``[B, Tp, 1]`` int32 tap-validity bits or None.
      extra: ``[B, Tp, Dp]`` added to the output (the residual ``dy`` in the backward) or None.
      direction: ``"causal"`` (``out[t] = sum_s w[K-1-s] x[t-s]``) or ``"anticausal"`` (``x[t+s]``).
      dw_x, dw_halo0, dw_bits: anti-causal only: the forward's input, its initial-history rows and its causal tap
        bits. When given, the kernel also returns per-tile partial sums ``[B, Tp / bt, K + 1, Dp]`` float32: rows
        ``0..K-1`` of ``sum_t out_in[t] * x[t-(K-1)+j]`` (the weight gradient when ``x`` here is ``g``) and row K of
        ``sum_t g[t]`` (the bias gradient).
    Returns: ``[B, Tp, Dp]`` in ``out_dtype`` (and the partial sums when ``dw_x`` is given).
    """
    bsz, tp, dp = x.shape
    k = w.shape[0]
    in_specs, args, tile, nt, nd, r = tile_and_halo_specs(x, bt, bd, hrows, direction, halo0)
    in_specs.append(pl.BlockSpec((k, bd), lambda b, d, t: (0, d)))
    args.append(w)
    if bias is not None:
        in_specs.append(pl.BlockSpec((1, bd), lambda b, d, t: (0, d)))
        args.append(bias)
    if bits is not None:
        in_specs.append(pl.BlockSpec((None, bt, 1), lambda b, d, t: (b, t, 0)))
        args.append(bits)
    if extra is not None:
        in_specs.append(tile)
        args.append(extra)
    with_dw = dw_x is not None
    out_shape, out_specs = jax.ShapeDtypeStruct((bsz, tp, dp), out_dtype), tile
    scratch = [pltpu.VMEM((bt + hrows, bd), jnp.float32)]
    if with_dw:
        if direction != "anticausal":
            raise ValueError("conv_call: dw_x is only meaningful for the anti-causal (backward) direction")
        in_specs += [tile, pl.BlockSpec((None, hrows, bd), lambda b, d, t: (b, jnp.maximum(t * r - 1, 0), d))]
        args += [dw_x, dw_x]
        if dw_halo0 is not None:
            in_specs.append(pl.BlockSpec((None, hrows, bd), lambda b, d, t: (b, 0, d)))
            args.append(dw_halo0)
        if dw_bits is not None:
            in_specs.append(pl.BlockSpec((None, bt, 1), lambda b, d, t: (b, t, 0)))
            args.append(dw_bits)
        out_shape = (out_shape, jax.ShapeDtypeStruct((bsz, nt, k + 1, dp), jnp.float32))
        out_specs = (tile, pl.BlockSpec((None, None, k + 1, bd), lambda b, d, t: (b, t, 0, d)))
        scratch.append(pltpu.VMEM((bt + hrows, bd), jnp.float32))
    kernel = functools.partial(
        _kernel,
        k=k,
        hrows=hrows,
        bt=bt,
        direction=direction,
        nt=nt,
        has_halo0=halo0 is not None,
        has_bias=bias is not None,
        has_bits=bits is not None,
        has_extra=extra is not None,
        activation=activation,
        residual_x=residual_x,
        with_dw=with_dw,
        dw_has_halo0=dw_halo0 is not None,
        dw_has_bits=dw_bits is not None,
    )
    cost = conv_cost(
        x,
        k,
        bt=bt,
        bd=bd,
        hrows=hrows,
        out_dtype=out_dtype,
        has_halo0=halo0 is not None,
        has_bias=bias is not None,
        bits_lanes=int(bits is not None),
        extra=extra,
        activation=activation,
        residual=residual_x,
        dw_x=dw_x,
        dw_halo0=dw_halo0 is not None,
        dw_bits=dw_bits is not None,
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        cost_estimate=cost,
        grid=(bsz, nd, nt),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=tpu_params(("parallel", "parallel", "parallel")),
        interpret=interpret,
        name=f"short_conv_{direction}",
    )(*args)
