"""Padding/planning around the tile kernels and the custom VJP of the short conv.

Forward saves only the inputs (x, weight, bias, segment ids, initial state); the backward recomputes what it needs:

* ``g = dy * silu'(pre)`` where ``pre`` is recomputed by the forward kernel (pre-activation, float32 output) only
  when the activation is on; otherwise ``g = dy``.
* ``dx = anti-causal conv of g (+ dy for the residual)``: the same tile kernel run in the "anticausal" direction
  (halo from the *next* block), residual fused; with segment ids it masks the anti-causal taps.
* ``dw`` and ``dbias`` (TPU): the dx kernel also reads the forward input tile (with its causal halo) and writes
  per-tile sums ``sum_t g[t] x[t-s]`` and ``sum_t g[t]`` (``[B, T/bt, K+1, D]``), which XLA adds up. Mosaic GPU: XLA
  reductions (``reference.dweight_xla``). ``d initial_state`` touches only the first K-1 outputs: XLA
  (``reference.dhistory_xla``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import BlockSizes, round_up, sublane_rows
from pallas_kernels.short_conv import gpu, reference, tpu


@dataclasses.dataclass(frozen=True)
class _Static:
    activation: str | None
    residual: bool
    backend: str
    interpret: bool
    block_sizes: BlockSizes


def _plan(x, k, bs: BlockSizes, backend: str = "tpu"):
    """Tile sizes for ``x: [B, T, D]``: (bt, bd, hrows, Tp, Dp). On GPU a narrow channel axis is zero-padded to a
    multiple of 64 rather than taken whole: Mosaic GPU's strided register layout splits a tile over 128 threads in
    vectors of up to 16 bytes, which a width like 40 does not divide ("WGStridedFragLayout(shape=(16, 40), ...)")."""
    _, t_len, d = x.shape
    hrows = round_up(max(k - 1, 1), sublane_rows(x.dtype))
    bt = round_up(min(bs.block_t, round_up(t_len, hrows)), hrows)
    tp = round_up(t_len, bt)
    if d % bs.block_d == 0:
        bd, dp = bs.block_d, d
    elif d <= bs.block_d and backend == "gpu":
        bd = dp = min(round_up(d, 64), round_up(d, bs.block_d))
    elif d <= bs.block_d:
        bd, dp = d, d
    else:
        bd, dp = bs.block_d, round_up(d, bs.block_d)
    return bt, bd, hrows, tp, dp


def _pad(a, tp, dp):
    return jnp.pad(a, ((0, 0), (0, tp - a.shape[1]), (0, dp - a.shape[2])))


def _bits(segment_ids, k, tp, direction):
    """``[B, Tp, 1]`` int32; bit ``s`` set when the tap ``s`` tokens back (causal) / ahead (anti-causal) is in the
    token's segment. Packing the K booleans into one int keeps the mask operand one lane wide."""
    if direction == "causal":
        m = reference.tap_masks(segment_ids, k)  # [B, T, K]
    else:
        bsz, t_len = segment_ids.shape
        pad = jnp.full((bsz, k - 1), -1, segment_ids.dtype)
        seg_f = jnp.concatenate([segment_ids, pad], axis=1)
        m = jnp.stack([seg_f[:, s : s + t_len] == segment_ids for s in range(k)], axis=-1)
    bits = jnp.sum(m.astype(jnp.int32) << jnp.arange(k, dtype=jnp.int32), axis=-1)
    return jnp.pad(bits, ((0, 0), (0, tp - bits.shape[1])))[..., None]


def _halo0(initial_state, hrows, dp, dtype):
    """``[B, hrows, Dp]``: the K-1 state rows right-aligned, zeros above them."""
    prev = jnp.swapaxes(initial_state[:, :, 1:], 1, 2).astype(dtype)  # [B, K-1, D]
    return jnp.pad(prev, ((0, 0), (hrows - prev.shape[1], 0), (0, dp - prev.shape[2])))


def _kernels(backend):
    return tpu if backend == "tpu" else gpu


def _forward(x, weight, bias, segment_ids, initial_state, st: _Static, *, activation, residual, out_dtype):
    k = weight.shape[0]
    bt, bd, hrows, tp, dp = _plan(x, k, st.block_sizes, st.backend)
    wp = jnp.pad(weight.astype(jnp.float32), ((0, 0), (0, dp - weight.shape[1])))
    bp = None if bias is None else jnp.pad(bias.astype(jnp.float32), (0, dp - bias.shape[0]))[None, :]
    h0 = None if initial_state is None else _halo0(initial_state, hrows, dp, x.dtype)
    bits = None if segment_ids is None else _bits(segment_ids, k, tp, "causal")
    y = _kernels(st.backend).conv_call(
        _pad(x, tp, dp),
        wp,
        halo0=h0,
        bias=bp,
        bits=bits,
        extra=None,
        direction="causal",
        activation=activation,
        residual_x=residual,
        out_dtype=out_dtype,
        bt=bt,
        bd=bd,
        hrows=hrows,
        interpret=st.interpret,
    )
    return y[:, : x.shape[1], : x.shape[2]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def short_conv_op(x, weight, bias, segment_ids, initial_state, st: _Static):
    return _forward(
        x,
        weight,
        bias,
        segment_ids,
        initial_state,
        st,
        activation=st.activation,
        residual=st.residual,
        out_dtype=x.dtype,
    )


def _fwd(x, weight, bias, segment_ids, initial_state, st):
    y = short_conv_op(x, weight, bias, segment_ids, initial_state, st)
    return y, (x, weight, bias, segment_ids, initial_state)


def _bwd(st, res, dy):
    x, weight, bias, segment_ids, initial_state = res
    k = weight.shape[0]
    t_len, d = x.shape[1], x.shape[2]
    if st.activation == "silu":
        pre = _forward(
            x, weight, bias, segment_ids, initial_state, st, activation=None, residual=False, out_dtype=jnp.float32
        )
        g = dy.astype(jnp.float32) * reference.silu_grad(pre)
    else:
        g = dy
    bt, bd, hrows, tp, dp = _plan(x, k, st.block_sizes, st.backend)
    wp = jnp.pad(weight.astype(jnp.float32), ((0, 0), (0, dp - d)))
    bits = None if segment_ids is None else _bits(segment_ids, k, tp, "anticausal")
    kw = dict(
        halo0=None,
        bias=None,
        bits=bits,
        extra=_pad(dy, tp, dp) if st.residual else None,
        direction="anticausal",
        activation=None,
        residual_x=False,
        out_dtype=x.dtype,
        bt=bt,
        bd=bd,
        hrows=hrows,
        interpret=st.interpret,
    )
    g32 = g.astype(jnp.float32)
    if st.backend == "tpu":  # dw and dbias as per-tile partial sums from the dx kernel, reduced here
        dx, partial = tpu.conv_call(
            _pad(g, tp, dp),
            wp,
            dw_x=_pad(x, tp, dp),
            dw_halo0=None if initial_state is None else _halo0(initial_state, hrows, dp, x.dtype),
            dw_bits=None if segment_ids is None else _bits(segment_ids, k, tp, "causal"),
            **kw,
        )
        sums = jnp.sum(partial, axis=(0, 1))[:, :d]
        dw, dbias = sums[:k].astype(weight.dtype), sums[k]
    else:  # Mosaic GPU: XLA reductions (see docs/kernels.md)
        dx = gpu.conv_call(_pad(g, tp, dp), wp, **kw)
        dw = reference.dweight_xla(g32, x, k, segment_ids, initial_state).astype(weight.dtype)
        dbias = jnp.sum(g32, axis=(0, 1))
    dx = dx[:, :t_len, :d]
    dbias = None if bias is None else dbias.astype(bias.dtype)
    dstate = None
    if initial_state is not None:
        dh = reference.dhistory_xla(g32, weight, segment_ids)  # [B, K-1, D]
        # slot 0 of the state is never read; explicit shape because dh has no rows when K = 1
        dstate = jnp.concatenate([jnp.zeros((dh.shape[0], 1, dh.shape[2]), dh.dtype), dh], axis=1)
        dstate = jnp.swapaxes(dstate, 1, 2).astype(initial_state.dtype)
    return dx, dw, dbias, None, dstate


short_conv_op.defvjp(_fwd, _bwd)
