"""Mosaic GPU kernel for the short conv (H100-class; no Triton).

Same tiling as ``tpu.py`` (grid ``(batch, channel_block, time_block)``, halo rows from a second BlockSpec, tile and
halo staged in one float32 shared-memory buffer, tap ``s`` = a shifted window of it). Differences forced by the
Mosaic GPU lowering in jax 0.10.2 (each found by ``jax.export(..., platforms=["cuda"])``):

* A ``[block_d]`` weight row cannot be broadcast against a ``[block_t, block_d]`` tile loaded from shared memory
  ("Incompatible FragmentedArray layouts" in lane semantics, "Layout inference failed to find a solution" in
  warpgroup semantics), so the wrapper passes the weights pre-broadcast to ``[K, block_t, channels]`` (and the bias
  to ``[block_t, channels]``): K·block_t·channels floats, read once per tile from L2.
* Values of different dtypes loaded from shared memory get different strided layouts, so every operand is first
  staged as float32 in shared memory (``jnp.concatenate`` is not lowered either).
* Segment ids: the packed ``[B, T, 1]`` int32 tap bits of the TPU kernel fail the TMA rule "async_copy requires
  all GMEM strides except the last one to be a multiple of 16 bytes", and a per-row mask column cannot be broadcast
  across the channel axis in the kernel (first point). So XLA expands the bits into float32 0/1 masks for the taps
  ``s = 1..K-1``, pre-broadcast across one channel block like the weights: ``[B, K-1, T, block_d]``
  (``tap_masks_lanes``; the block index ignores the channel block, so every channel block reads the same mask tile).
  The kernel multiplies the shifted window of tap ``s`` by its ``[block_t, block_d]`` mask tile, in the causal
  forward and in the anti-causal dx kernel of the backward (there bit ``s`` = token ``t+s`` in ``t``'s segment);
  dw/dbias are XLA reductions with the same masks. Cost: a ``(K-1) * block_d * 4``-byte mask per token in HBM
  (1.5 KiB at K=4, ``block_d=128``: 38 % of a bf16 ``x`` at D=2048, 5 % at D=16384), re-read by every channel
  block (``(K-1) * D * 4`` bytes per token in all, unless L2 serves the repeats), and
  ``(K-1) * block_t * block_d * 4`` bytes of shared memory per CTA (48 KiB at the defaults).
* Shared memory (227 KiB per CTA on H100) grows with ``K * block_t`` (pre-broadcast weights and masks; the
  pipeline is single-buffered): ``smem_bytes`` models the allocation exactly (every operand block and scratch
  buffer rounded up to 1 KiB, plus an 8-byte barrier) and ``conv_call`` lowers ``block_t`` to the largest
  divisor (in ``hrows`` steps) that fits (16 rows for most calls with K >= 5 and segment ids at ``block_d=128``).
* ``commit_smem`` (fence + warpgroup barrier) separates the staging writes from the shifted reads; it has no CPU
  rule, so interpret mode skips it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import gpu_params
from pallas_kernels.cost import conv_cost
from pallas_kernels.short_conv.tiling import stage_tile_and_halo, tile_and_halo_specs


def _kernel(
    *refs, k, hrows, bt, direction, nt, has_halo0, has_bias, has_mask, has_extra, activation, residual_x, interpret
):
    it = iter(refs)
    x_ref, halo_ref = next(it), next(it)
    halo0_ref = next(it) if has_halo0 else None
    w_ref = next(it)
    bias_ref = next(it) if has_bias else None
    mask_ref = next(it) if has_mask else None
    extra_ref = next(it) if has_extra else None
    o_ref, buf, stage = next(it), next(it), next(it)
    bd = x_ref.shape[-1]
    x = x_ref[...].astype(jnp.float32)
    main = stage_tile_and_halo(buf, x, halo_ref, halo0_ref, direction=direction, hrows=hrows, bt=bt, nt=nt)
    if has_extra:
        stage[...] = extra_ref[...].astype(jnp.float32)
    if not interpret:
        plgpu.commit_smem()
    acc = jnp.zeros((bt, bd), jnp.float32)
    for s in range(k):  # tap s reads s tokens back (causal) or ahead (anti-causal) with weight row K-1-s
        start = main - s if direction == "causal" else s
        tap = buf[pl.ds(start, bt), :]
        if has_mask and s > 0:  # 1.0 where the tap is in the token's segment, 0.0 elsewhere
            tap = tap * mask_ref[s - 1]
        acc = acc + tap * w_ref[k - 1 - s]
    if has_bias:
        acc = acc + bias_ref[...]
    if activation == "silu":
        acc = acc * jax.nn.sigmoid(acc)
    if residual_x:
        acc = acc + buf[pl.ds(main, bt), :]
    if has_extra:
        acc = acc + stage[...]
    o_ref[...] = acc.astype(o_ref.dtype)


SMEM_BYTES = 227 * 1024  # H100 shared memory per block (opt-in), what Mosaic GPU checks at lowering time


def smem_bytes(bt, bd, hrows, k, *, x_dtype, out_dtype, has_halo0, has_bias, has_mask, extra_dtype):
    """Shared memory of one ``conv_call`` CTA: every block operand once (single-buffered pipeline) and the two
    float32 scratch buffers, each rounded up to 1 KiB, plus the 8-byte barrier. Matches the ``smem_bytes`` that
    Mosaic GPU reports (checked by export against its "exceeds available shared memory" error on 800 configs)."""
    xi, oi = jnp.dtype(x_dtype).itemsize, jnp.dtype(out_dtype).itemsize
    bufs = [bt * bd * xi, hrows * bd * xi, k * bt * bd * 4, bt * bd * oi, (bt + hrows) * bd * 4, bt * bd * 4]
    if has_halo0:
        bufs.append(hrows * bd * xi)
    if has_bias:
        bufs.append(bt * bd * 4)
    if has_mask:
        bufs.append((k - 1) * bt * bd * 4)
    if extra_dtype is not None:
        bufs.append(bt * bd * jnp.dtype(extra_dtype).itemsize)
    return sum(-(-n // 1024) * 1024 for n in bufs) + 8


def fit_block_t(bt, hrows, fits):
    """Largest ``bt' = hrows * m`` with ``m`` dividing ``bt // hrows`` (so ``bt'`` still tiles the padded time axis
    and the halo blocks) for which ``fits(bt')``; ``None`` when even ``hrows`` rows do not fit."""
    r = bt // hrows
    for m in sorted((m for m in range(1, r + 1) if r % m == 0), reverse=True):
        if fits(hrows * m):
            return hrows * m
    return None


def tap_masks_lanes(bits, k, bd):
    """``bits: [B, Tp, 1]`` int32 tap-validity bits (bit ``s`` = tap ``s`` in the token's segment) ->
    ``[B, K-1, Tp, bd]`` float32 0/1 masks for the taps ``s = 1..K-1``, broadcast across ``bd`` lanes so that the
    kernel multiplies the shifted ``[bt, bd]`` window by a ``[bt, bd]`` mask tile (no in-kernel broadcast; see the
    module docstring). Tap 0 (the token itself) is always in its segment and has no mask."""
    s = jnp.arange(1, k, dtype=jnp.int32)
    m = ((bits >> s) & 1).astype(jnp.float32)  # [B, Tp, K-1]
    m = jnp.swapaxes(m, 1, 2)[..., None]  # [B, K-1, Tp, 1]
    return jnp.broadcast_to(m, m.shape[:3] + (bd,))


def conv_call(
    x, w, *, halo0, bias, bits, extra, direction, activation, residual_x, out_dtype, bt, bd, hrows, interpret
):
    """Same contract as ``tpu.conv_call`` (without the fused weight gradient). ``bits`` (the packed tap bits of
    ``op._bits``) is expanded here by XLA into ``tap_masks_lanes``: ``(K-1) * bd`` float32 per token, read once per
    tile and channel block."""
    bsz, tp, dp = x.shape
    k = w.shape[0]
    has_mask = bits is not None and k > 1
    need = functools.partial(
        smem_bytes,
        bd=bd,
        hrows=hrows,
        k=k,
        x_dtype=x.dtype,
        out_dtype=out_dtype,
        has_halo0=halo0 is not None,
        has_bias=bias is not None,
        has_mask=has_mask,
        extra_dtype=None if extra is None else extra.dtype,
    )
    # The pre-broadcast weights and masks grow with K * block_t: shrink the tile height rather than fail to lower.
    bt_fit = fit_block_t(bt, hrows, lambda b: need(b) <= SMEM_BYTES)
    if bt_fit is None:
        raise ValueError(
            f"short_conv (Mosaic GPU): K={k}, block_d={bd} needs {need(hrows)} bytes of shared memory "
            f"even at block_t={hrows} (limit {SMEM_BYTES}); use a smaller BlockSizes.block_d"
        )
    bt = bt_fit
    in_specs, args, tile, nt, nd, r = tile_and_halo_specs(x, bt, bd, hrows, direction, halo0)
    in_specs.append(pl.BlockSpec((k, bt, bd), lambda b, d, t: (0, 0, d)))
    args.append(jnp.broadcast_to(w[:, None, :], (k, bt, dp)))
    if bias is not None:
        in_specs.append(pl.BlockSpec((bt, bd), lambda b, d, t: (0, d)))
        args.append(jnp.broadcast_to(bias, (bt, dp)))
    if has_mask:
        in_specs.append(pl.BlockSpec((None, k - 1, bt, bd), lambda b, d, t: (b, 0, t, 0)))
        args.append(tap_masks_lanes(bits, k, bd))
    if extra is not None:
        in_specs.append(tile)
        args.append(extra)
    kernel = functools.partial(
        _kernel,
        k=k,
        hrows=hrows,
        bt=bt,
        direction=direction,
        nt=nt,
        has_halo0=halo0 is not None,
        has_bias=bias is not None,
        has_mask=has_mask,
        has_extra=extra is not None,
        activation=activation,
        residual_x=residual_x,
        interpret=interpret,
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
        bits_lanes=(k - 1) * bd if has_mask else 0,
        extra=extra,
        activation=activation,
        residual=residual_x,
        weights_per_step=True,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((bsz, tp, dp), out_dtype),
        cost_estimate=cost,
        grid=(bsz, nd, nt),
        in_specs=in_specs,
        out_specs=tile,
        scratch_shapes=[plgpu.SMEM((bt + hrows, bd), jnp.float32), plgpu.SMEM((bt, bd), jnp.float32)],
        compiler_params=gpu_params(),
        interpret=interpret,
        name=f"short_conv_{direction}",
    )(*args)
