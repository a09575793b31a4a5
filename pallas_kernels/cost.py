"""``pl.CostEstimate`` for every kernel, from the shapes.

XLA cannot see inside a Pallas call: without an estimate its cost analysis (and the TPU scheduler's overlap
decisions) count a kernel as free. The counts below follow the kernels' code: a matmul ``[m, k]·[k, n]`` is
``2·m·k·n`` flops, an element-wise multiply or add one flop, ``exp`` one transcendental; selects, casts and iotas
are free. Bytes are HBM traffic: each block DMA'd counts once per grid step that fetches it (Pallas skips the copy
when consecutive steps use the same block index, which the formulas take into account where it applies).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax.experimental import pallas as pl


def estimate(flops, transcendentals, bytes_accessed) -> pl.CostEstimate:
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(bytes_accessed))


def nbytes(*arrays) -> int:
    """HBM bytes of arrays / ``ShapeDtypeStruct``s read or written once each (``None`` skipped)."""
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays if a is not None)


# --------------------------------------------------------------------------------------------------------- short conv
def conv_flops(k: int, *, has_bias: bool, activation, residual: bool, extra: bool):
    """Per output element: ``(flops, transcendentals)`` of ``act(sum_s w_s x_{t-s} + bias) (+ x) (+ extra)``:
    K multiplies and K - 1 adds, the bias add, SiLU as ``z / (1 + exp(-z))`` (exp, add, divide; the TPU's divide
    is a reciprocal and a multiply: counted as 2) and the residual/extra adds."""
    flops = 2 * k - 1 + int(has_bias) + int(residual) + int(extra)
    trans = 0
    if activation == "silu":
        flops += 3
        trans += 1
    return flops, trans


def conv_cost(
    x,
    w_rows: int,
    *,
    bt: int,
    bd: int,
    hrows: int,
    out_dtype,
    has_halo0: bool,
    has_bias: bool,
    bits_lanes: int,
    extra=None,
    activation=None,
    residual: bool = False,
    weights_per_step: bool = False,
    dw_x=None,
    dw_halo0: bool = False,
    dw_bits: bool = False,
) -> pl.CostEstimate:
    """One ``conv_call`` on padded ``x [B, Tp, Dp]`` with grid ``(B, Dp/bd, Tp/bt)`` (``t`` fastest).

    ``w_rows`` is K. ``bits_lanes``: per-token, per-channel-block int32/float32 words of segment information each
    step reads (TPU: 1 packed word, re-read by every channel block; GPU: ``(K-1)·bd`` float32 masks; 0 without
    segments). ``weights_per_step``: the GPU kernel reads its pre-broadcast ``[K, bt, bd]`` weight (and
    ``[bt, bd]`` bias) tile at every step; the TPU kernel fetches its ``[K, bd]`` rows once per channel block.
    ``dw_x`` (TPU backward): also reads the forward input (tile + halo) and writes ``[B, Tp/bt, K+1, Dp]`` f32
    partial weight/bias sums: ``2K + 1`` more flops per element (K multiply-adds, the bias sum).
    """
    bsz, tp, dp = x.shape
    k = w_rows
    nt, nd = tp // bt, dp // bd
    elems = bsz * tp * dp
    xb = jnp.dtype(x.dtype).itemsize
    f, tr = conv_flops(k, has_bias=has_bias, activation=activation, residual=residual, extra=extra is not None)
    flops, trans = f * elems, tr * elems
    tile_reads = elems * xb * (bt + hrows) // bt  # tile + its halo block
    byts = tile_reads + elems * jnp.dtype(out_dtype).itemsize + nbytes(extra)
    byts += bsz * hrows * dp * xb if has_halo0 else 0
    if weights_per_step:
        byts += bsz * nt * nd * (k + int(has_bias)) * bt * bd * 4
    else:
        byts += bsz * nd * (k + int(has_bias)) * bd * 4
    byts += bsz * tp * nd * bits_lanes * 4
    if dw_x is not None:
        flops += (2 * k + 1) * elems
        byts += elems * jnp.dtype(dw_x.dtype).itemsize * (bt + hrows) // bt
        byts += bsz * hrows * dp * jnp.dtype(dw_x.dtype).itemsize if dw_halo0 else 0
        byts += bsz * tp * nd * 4 if dw_bits else 0
        byts += bsz * nt * (k + 1) * dp * 4
    return estimate(flops, trans, byts)


# ------------------------------------------------------------------------------------------- linear scan (TPU kernels)
def scan_chunk_flops(c: int, dk: int, dv: int, *, scalar: bool, sub: int, states_only: bool = False):
    """``(flops, transcendentals)`` of one chunk of ``reference.chunk_step`` (the TPU forward kernel's body).

    Both gate kinds: the inter-chunk output ``(q·e^b) Sᵀ`` (``2·C·Dk·Dv``) and the state update
    ``e^{b_C} S + Vᵀ (K e^{b_C − b})`` (``2·C·Dk·Dv + Dk·Dv``). Scalar gates: ``Q Kᵀ`` (``2C²Dk``), the decay
    ``[C, C]`` (C² exps, C² multiplies), ``P V`` (``2C²Dv``). Vector gates with ``n = C / L`` sub-chunks: each of the
    ``n(n−1)/2`` earlier pairs is two ``[L, Dk]`` factor products, ``Q_i K_jᵀ`` (``2L²Dk``) and ``A V`` (``2L²Dv``),
    with ``2·L·Dk`` exps; the diagonal sub-chunks go one column at a time (``L·Dk`` exps, ``3·L·Dk`` flops for the
    scores and ``2·L·Dv`` for the output per column)."""
    mm_state = 2 * c * dk * dv + dk * dv + c * dk  # Vᵀ(K·e), S·e^{b_C}, K·e
    trans_state = c * (dk if not scalar else 1) + (dk if not scalar else 1)
    if states_only:
        return mm_state, trans_state
    flops = mm_state + 2 * c * dk * dv + c * dk  # inter term and q·e^b
    trans = trans_state + c * (1 if scalar else dk)
    if scalar:
        flops += 2 * c * c * dk + 2 * c * c * dv + c * c
        trans += c * c
    else:
        n = c // sub
        pairs = n * (n - 1) // 2
        flops += pairs * (2 * sub * dk + 2 * sub * sub * dk + 2 * sub * sub * dv + sub * dv)
        trans += pairs * 2 * sub * dk
        flops += n * sub * (3 * sub * dk + 2 * sub * dv)
        trans += n * sub * sub * dk
    return flops, trans


def scan_chunk_bwd_flops(c: int, dk: int, dv: int, *, scalar: bool, sub: int):
    """``(flops, transcendentals)`` of one chunk of ``reference.chunk_step_bwd`` (the TPU reverse-time kernel).

    State terms (both kinds): ``dO S`` for dq, ``V dSᵀ`` for dk, ``(K e) dS`` for dv and ``dOᵀ (q̂ e^b)`` for the
    state gradient: ``4 · 2·C·Dk·Dv``. Scalar gates: ``dO Vᵀ`` and ``P V``-like products: ``3·2C²Dk + 2·2C²Dv``
    and the ``[C, C]`` decay. Vector gates: per earlier pair ``3·2L²Dk + 2·2L²Dv`` plus the factors; per diagonal
    column ``8·L·Dk + 4·L·Dv`` (scores, ``dA`` column, dq, dk, dv updates). Gate gradient: ``4·C·Dk``."""
    flops = 8 * c * dk * dv + 2 * dk * dv + 6 * c * dk
    trans = 2 * c * (1 if scalar else dk) + (1 if scalar else dk)
    if scalar:
        flops += 3 * 2 * c * c * dk + 2 * 2 * c * c * dv + 2 * c * c
        trans += c * c
    else:
        n = c // sub
        pairs = n * (n - 1) // 2
        flops += pairs * (3 * 2 * sub * sub * dk + 2 * 2 * sub * sub * dv + 6 * sub * dk)
        trans += pairs * 2 * sub * dk
        flops += n * sub * (8 * sub * dk + 4 * sub * dv)
        trans += n * sub * sub * dk
    return flops, trans


def scan_cost(
    bsz, heads, n_chunks, chunk, dk, dv, *, scalar, sub, operands, outputs, rep=1, backward=False, states_only=False
) -> pl.CostEstimate:
    """A TPU scan kernel over the grid ``(B, H, chunks)``: the per-chunk counts times the grid, and every operand
    and output read/written once (each chunk block is fetched by exactly one step; the ``[Dv, Dk]`` state blocks
    once per ``(b, h)``). ``operands``/``outputs``: the arrays passed and returned; the first two (q, k) are read
    ``rep`` times when ``rep`` heads share them (grouped heads read through ``h // rep``)."""
    per = (
        scan_chunk_bwd_flops(chunk, dk, dv, scalar=scalar, sub=sub)
        if backward
        else scan_chunk_flops(chunk, dk, dv, scalar=scalar, sub=sub, states_only=states_only)
    )
    steps = bsz * heads * n_chunks
    reads = rep * nbytes(*operands[:2]) + nbytes(*operands[2:])
    return estimate(per[0] * steps, per[1] * steps, reads + nbytes(*outputs))
