"""Mosaic GPU (Hopper, wgmma) *backward* kernels of the chunked scan, for scalar gates (Mamba2 SSD) and vector gates
(GLA), with the XLA glue that makes them the backward of ``gpu.scalar_scan`` / ``gpu.vector_scan``. Building blocks
(wgmma helpers, the double-buffered TMA pipeline) are in ``gpu_common``.

Notation per (batch, head), chunk c of C tokens: ``b`` the chunk-local cumulative log-gates (float32, <= 0,
non-increasing; one column per key channel for GLA, a scalar for SSD), ``b_C`` its last row, ``q̂ = scale q``,
``S_c`` the state ``[Dk, Dv]`` entering chunk c, ``X_c`` the gradient of the state *leaving* chunk c, ``dO`` the
output cotangent, ``dS_T`` the final-state cotangent.

1. ``state_pass`` (one kernel, both gate kinds, both directions; grid ``(B, H, Dv / block_dv)``): a CTA carries a
   ``[Dk, block_dv]`` float32 state in registers through a ``fori_loop`` over the chunks (double-buffered TMA, as
   the forward) and applies ``X <- dec_c ⊙ X + L_c^T R_c`` (one ``[Dk, C] x [C, block_dv]`` wgmma per chunk), with
   ``L_c^T`` pre-scaled and pre-transposed by XLA (bfloat16) and ``dec_c [Dk]`` float32. It stores the value
   *before* each chunk's update (bfloat16, ``[B, H, n, Dk, Dv]``) and the final value (float32). Forward recompute:
   ``L^T = (k ⊙ e^{b_C - b})^T``, ``R = v``, ``dec = e^{b_C}``, start ``S_0`` -> ``S_c`` and ``S_T``. Reverse
   (``reverse=True``, chunk ``n - 1 - i`` at step i): ``L^T = (q̂ ⊙ e^b)^T``, ``R = dO``, start ``dS_T`` -> ``X_c``
   and ``dS_0``.
2. ``*_grads_dqk`` (grid ``(B, H, n, Dv / block_dv)``, one chunk per CTA, no loop): with ``dA = dO v^T``,
   ``dq̂_t = e^{b_t} ⊙ (S dO_t) + Σ_{s<=t} dA_ts (k_s ⊙ e^{b_t - b_s})`` and
   ``dk_s = e^{b_C - b_s} ⊙ (X v_s) + Σ_{t>=s} dA_ts (q̂_t ⊙ e^{b_t - b_s})``; wgmma ``dO v^T``, ``v dO^T`` (the
   transposed ``dA``, so that no operand needs a transposed view), ``dO S^T``, ``v X^T`` and the masked ``dA`` /
   ``dA^T`` (bfloat16 in shared memory) times ``k`` / ``q̂``. Outputs are float32 partial sums over the Dv blocks,
   ``[Dv / block_dv, B, T, H, Dk]``, added by XLA.
3. ``*_grads_dv`` (same grid): ``dv_s = Σ_{t>=s} A_ts dO_t + X^T (k_s ⊙ e^{b_C - b_s})`` with ``A^T`` built like the
   forward's scores but transposed (``k q̂^T``, from a pre-transposed ``q̂^T``), float32 ``[B, T, H, Dv]``.
4. XLA: the gate gradient (below), group sums (SSD), the factors back from GLA's sub-chunk references.

Scalar gates (``ssd_grads_*``): the decay ``D_ts = e^{b_t - b_s}[t >= s]`` is applied to ``dA`` / ``dA^T`` / ``k q̂^T``
in registers (one ``[C, C]`` matrix, as in ``ssd_scan_fwd``), the per-row factors ``e^{b_t}``, ``e^{b_C - b_s}`` to
accumulator rows. Vector gates (``gla_grads_*``): the forward's sub-chunk factorisation (``prep_vector_gates``,
``gla_factor_rows``): ``qm = scale q e^{b_t - m_i}``, ``km = k e^{m_j - b_s}`` referred to the middle row of
their sub-chunk, and the per-chunk factor table (inter, koff, kstate, qoff, decay). Then

* ``dqm = inter_i ⊙ (dO S^T) + (dA ⊙ diag) km + Σ_j qoff(i, j) ⊙ ((dA, columns in sub-chunk j, rows in later
  sub-chunks) (km ⊙ koff_{j(s)}))``;
* ``dkm = kstate_j ⊙ (v X^T) + (dA^T ⊙ diag^T) qm + koff_{j(s)} ⊙ Σ_j [rows in j] (dA^T, columns in later
  sub-chunks) (qm ⊙ qoff(i(t), j))``;
* ``A^T = (km qm^T ⊙ diag^T) + Σ_j [rows in j] (km ⊙ koff) (qm^T ⊙ qoff(i(t), j))``,
  ``dv = A^T dO + (km ⊙ kstate) X``;

and XLA turns them back: ``dq = dqm ⊙ scale e^{b_t - m_i}``, ``dk = dkm ⊙ e^{m_j - b_s}`` (``q̂ ⊙ dq̂ = qm ⊙ dqm``).

Gate gradient (XLA, float32). The loss depends on the cumulative gates only through differences ``b_t - b_s`` (q̂
always appears with ``e^{b_t}``, k with ``e^{-b_s}``) and through the decay of the states, so with chunk-local
cumulative gates ``db_t = q̂_t ⊙ dq̂_t - k_t ⊙ dk_t`` plus, on the chunk's last row, ``Σ_v S_{c+1} ⊙ X_c`` (the state
leaving the chunk times its gradient; ``S_n = S_T``), summed over Dk for scalar gates; the raw-gate gradient is the
reverse cumulative sum of ``db`` *inside each chunk*. This is the global identity (``dB_t = q̂ ⊙ dq̂ - k ⊙ dk``, plus
``Σ_v S_T ⊙ dS_T`` on the last row, reverse-summed over the whole sequence) regrouped per chunk: the boundary term
equals the sum of all later ``dB``. Both are exact; with bfloat16 operands the per-chunk form is the accurate one,
because the whole-sequence sum accumulates the rounding errors of every later token (measured, docs/kernels.md).
The products ``q̂ ⊙ dq̂``, ``k ⊙ dk`` use the bfloat16 values the kernels multiplied with, so that the diagonal
score terms (and for scalar gates all intra-chunk terms, whose masked ``dA`` and ``dA^T`` are the same bfloat16
numbers) cancel exactly between the q side and the k side.

Shared memory at C = 64, Dk = 128, block_dv = 64 (``*_smem_bytes``: every buffer rounded up to 1 KiB as Mosaic GPU
allocates it, plus 8 bytes per barrier; equal to Mosaic's own count, tested): ``state_pass`` 99,384 bytes;
``ssd_grads_dqk`` 150,616; ``ssd_grads_dv`` 84,016; ``gla_grads_dqk`` 165,960; ``gla_grads_dv`` 124,968 (limit
232,448). The split of dq/dk from dv is what keeps GLA under it: one kernel with both operand sets (adding ``qm^T``,
``X``, ``qm^T ⊙ qoff``, ``A^T`` and a dv tile to ``gla_grads_dqk``) would take 239,688 bytes without buffer reuse.

Known precision effect of the Dv split: ``dA = dO v^T`` is a partial sum per Dv block, rounded to bfloat16 per block
before its wgmma; where the blocks' partials cancel, that entry's relative error exceeds one rounding (seen: 0.95 %
on the largest ``dqm`` entry of the kernel test, two partials -4.17 and 8.41; the end-to-end gradients stay within
5e-3 of their scale in the tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.linear_scan.gpu_common import (
    COL,
    ROW,
    WG,
    double_buffered,
    layout_helpers,
    load_all,
    mm,
    mm2,
    mm_acc,
    pipeline_barriers,
    scale_sub,
    scratch_bytes,
    smem_tile,
    store_tile,
)
from pallas_kernels.linear_scan.gpu_fwd import gla_factor_rows, prep_gates, prep_vector_gates

BF16, F32 = jnp.bfloat16, jnp.float32


# --- A: the state pass ---------------------------------------------------------------------------------------------


def state_pass(lt, r, dec, s0, *, chunk: int, block_dv: int, reverse: bool, interpret=None):
    """``X <- dec_c ⊙ X + L_c^T R_c`` over the chunks (forward, or last to first with ``reverse``).

    Args:
      lt: ``[B, H, Dk, T]`` bfloat16, ``L^T`` (pre-scaled, pre-transposed). r: ``[B, T, H, Dv]`` bfloat16.
      dec: ``[B, H, T // chunk, Dk]`` float32 per-chunk decay of the state rows. s0: ``[B, H, Dk, Dv]`` float32 start.
      chunk: C (multiple of 64 dividing T); block_dv: Dv columns per CTA.
    Returns:
      ``(states [B, H, T // chunk, Dk, Dv] bfloat16: the value before chunk c's update, final [B, H, Dk, Dv]
      float32: the value after the last update)``.
    """
    bsz, heads, dk, t_len = lt.shape
    dv = r.shape[3]
    n, nv, c, dvb = t_len // chunk, dv // block_dv, chunk, block_dv
    lc, _ = layout_helpers(interpret)
    chunk_of = (lambda i: n - 1 - i) if reverse else (lambda i: i)

    def body(lt_ref, r_ref, dec_ref, s0_ref, st_ref, sf_ref, lt_s, r_s, dec_s, s16_s, s32_s, bars):
        bi, hi, vi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
        cols = pl.ds(vi * dvb, dvb)

        def sources(i):
            ci = chunk_of(i)
            rows = pl.ds(ci * c, c)
            return (lt_ref.at[bi, hi, :, rows], r_ref.at[bi, rows, hi, cols], dec_ref.at[bi, hi, ci, :])

        start, acquire = double_buffered((lt_s, r_s, dec_s), bars, sources, n)
        start(s0_ref.at[bi, hi, :, cols], s32_s)
        st = lc(s32_s[...], WG)

        def step(i, st):
            lt_c, r_c, dec_c = acquire(i)
            s16_s[...] = st.astype(BF16)  # the value before this chunk's update
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(s16_s, st_ref.at[bi, hi, chunk_of(i), :, cols])
            upd = mm(lt_c, r_c, (dk, dvb))
            st = st * lax.broadcast_in_dim(lc(dec_c[...], ROW), (dk, dvb), [0]) + upd
            plgpu.wait_smem_to_gmem(0)  # s16_s is rewritten by the next step
            return st

        st = lax.fori_loop(0, n, step, st)
        s32_s[...] = st
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s32_s, sf_ref.at[bi, hi, :, cols])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        smem_tile((2, dk, c), BF16),  # L^T (double-buffered)
        smem_tile((2, c, dvb), BF16),  # R
        plgpu.SMEM((2, dk), F32),  # decay
        smem_tile((dk, dvb), BF16),  # the state before the update (output tile)
        smem_tile((dk, dvb), F32),  # start / final value
        plgpu.Barrier(num_barriers=pipeline_barriers(3)),
    ]
    kernel = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((bsz, heads, n, dk, dv), BF16), jax.ShapeDtypeStruct((bsz, heads, dk, dv), F32)),
        scratch_types=scratch,
        grid=(bsz, heads, nv),
        grid_names=("b", "h", "v"),
        interpret=interpret,
        kernel_name="scan_state_pass_rev" if reverse else "scan_state_pass_fwd",
    )
    return kernel(lt, r, dec, s0)


def state_pass_smem_bytes(chunk, dk, block_dv):
    c, dvb = chunk, block_dv
    return scratch_bytes(
        ((2, dk, c), BF16), ((2, c, dvb), BF16), ((2, dk), F32), ((dk, dvb), BF16), ((dk, dvb), F32), 7
    )


# --- B and C, scalar gates -----------------------------------------------------------------------------------------


def ssd_grads_dqk(q, k, v, vt, do, dot, st, xt, b, eb, ek, *, chunk: int, block_dv: int, rep: int = 1, interpret=None):
    """dq̂ and dk of the scalar-gate scan, one chunk and Dv block per CTA.

    Args:
      q, k: ``[B, T, G, Dk]`` bfloat16 (q̂ = scale q, and k; head h reads group ``h // rep``).
      v, do: ``[B, T, H, Dv]`` bfloat16; vt, dot: ``[B, H, Dv, T]`` bfloat16 (their transposes).
      st, xt: ``[B, H, n, Dv, Dk]`` bfloat16, ``S_c^T`` (state entering chunk c) and ``X_c^T`` (gradient of the state
        leaving it).
      b, eb, ek: ``[B, H, T]`` float32: chunk-local cumulative log-gates, ``e^b``, ``e^{b_C - b}``.
    Returns:
      ``(dq̂, dk)``, each ``[Dv / block_dv, B, T, H, Dk]`` float32 partial sums over the Dv blocks (per head).
    """
    bsz, t_len, groups, dk = q.shape
    heads, dv = v.shape[2], v.shape[3]
    n, nv, c, dvb = t_len // chunk, dv // block_dv, chunk, block_dv
    lc, iota = layout_helpers(interpret)

    def body(
        q_ref,
        k_ref,
        v_ref,
        vt_ref,
        do_ref,
        dot_ref,
        st_ref,
        xt_ref,
        b_ref,
        eb_ref,
        ek_ref,
        dq_ref,
        dk_ref,
        q_s,
        k_s,
        v_s,
        vt_s,
        do_s,
        dot_s,
        st_s,
        xt_s,
        b_s,
        eb_s,
        ek_s,
        p_s,
        pt_s,
        o_s,
        bars,
    ):
        bi, hi, ci, vi = (lax.axis_index(a) for a in ("b", "h", "c", "v"))
        gi = lax.div(hi, jnp.int32(rep))
        rows, cols = pl.ds(ci * c, c), pl.ds(vi * dvb, dvb)
        load_all(
            (
                (q_ref.at[bi, rows, gi, :], q_s),
                (k_ref.at[bi, rows, gi, :], k_s),
                (v_ref.at[bi, rows, hi, cols], v_s),
                (vt_ref.at[bi, hi, cols, rows], vt_s),
                (do_ref.at[bi, rows, hi, cols], do_s),
                (dot_ref.at[bi, hi, cols, rows], dot_s),
                (st_ref.at[bi, hi, ci, cols, :], st_s),
                (xt_ref.at[bi, hi, ci, cols, :], xt_s),
                (b_ref.at[bi, hi, rows], b_s),
                (eb_ref.at[bi, hi, rows], eb_s),
                (ek_ref.at[bi, hi, rows], ek_s),
            ),
            bars,
        )
        da = mm(do_s, vt_s, (c, c))  # dA[t, s] = dO_t . v_s
        dat = mm(v_s, dot_s, (c, c))  # dA^T[s, t]
        diff = lax.broadcast_in_dim(lc(b_s[...], ROW), (c, c), [0]) - lax.broadcast_in_dim(
            lc(b_s[...], COL), (c, c), [1]
        )  # b_row - b_col
        r_id, c_id = iota((c, c), 0), iota((c, c), 1)
        # the kept entries have a non-positive exponent; minimum() keeps the dropped ones finite before where()
        p_s[...] = jnp.where(r_id >= c_id, da * jnp.exp(jnp.minimum(diff, 0.0)), 0.0).astype(BF16)
        pt_s[...] = jnp.where(c_id >= r_id, dat * jnp.exp(jnp.minimum(-diff, 0.0)), 0.0).astype(BF16)
        plgpu.commit_smem()
        row = lambda ref: lax.broadcast_in_dim(lc(ref[...], ROW), (c, dk), [0])
        dq = mm(do_s, st_s, (c, dk)) * row(eb_s) + mm(p_s, k_s, (c, dk))
        store_tile(dq, o_s, dq_ref.at[vi, bi, rows, hi, :])
        dkv = mm(v_s, xt_s, (c, dk)) * row(ek_s) + mm(pt_s, q_s, (c, dk))
        store_tile(dkv, o_s, dk_ref.at[vi, bi, rows, hi, :])

    scratch = [
        smem_tile((c, dk), BF16),
        smem_tile((c, dk), BF16),  # q̂, k
        smem_tile((c, dvb), BF16),
        smem_tile((dvb, c), BF16),  # v, v^T
        smem_tile((c, dvb), BF16),
        smem_tile((dvb, c), BF16),  # dO, dO^T
        smem_tile((dvb, dk), BF16),
        smem_tile((dvb, dk), BF16),  # S^T, X^T
        plgpu.SMEM((c,), F32),
        plgpu.SMEM((c,), F32),
        plgpu.SMEM((c,), F32),  # b, e^b, e^{b_C - b}
        smem_tile((c, c), BF16),
        smem_tile((c, c), BF16),  # masked dA, dA^T
        smem_tile((c, dk), F32),  # output tile (dq̂, then dk)
        plgpu.Barrier(num_barriers=11),
    ]
    out = jax.ShapeDtypeStruct((nv, bsz, t_len, heads, dk), F32)
    kernel = plgpu.kernel(
        body,
        out_type=(out, out),
        scratch_types=scratch,
        grid=(bsz, heads, n, nv),
        grid_names=("b", "h", "c", "v"),
        interpret=interpret,
        kernel_name="ssd_scan_bwd_dqk",
    )
    return kernel(q, k, v, vt, do, dot, st, xt, b, eb, ek)


def ssd_grads_dqk_smem_bytes(chunk, dk, block_dv):
    c, dvb = chunk, block_dv
    return scratch_bytes(
        ((c, dk), BF16),
        ((c, dk), BF16),
        ((c, dvb), BF16),
        ((dvb, c), BF16),
        ((c, dvb), BF16),
        ((dvb, c), BF16),
        ((dvb, dk), BF16),
        ((dvb, dk), BF16),
        ((c,), F32),
        ((c,), F32),
        ((c,), F32),
        ((c, c), BF16),
        ((c, c), BF16),
        ((c, dk), F32),
        11,
    )


def ssd_grads_dv(k, qt, do, x, b, ek, *, chunk: int, block_dv: int, rep: int = 1, interpret=None):
    """dv of the scalar-gate scan: ``dv = ((k q̂^T) ⊙ D^T) dO + e^{b_C - b_s} ⊙ (k X)``.

    Args:
      k: ``[B, T, G, Dk]`` bfloat16; qt: ``[B, G, Dk, T]`` bfloat16 (q̂ transposed); do: ``[B, T, H, Dv]`` bfloat16;
      x: ``[B, H, n, Dk, Dv]`` bfloat16 (``X_c``); b, ek: ``[B, H, T]`` float32.
    Returns:
      ``dv [B, T, H, Dv]`` float32.
    """
    bsz, t_len, groups, dk = k.shape
    heads, dv = do.shape[2], do.shape[3]
    n, nv, c, dvb = t_len // chunk, dv // block_dv, chunk, block_dv
    lc, iota = layout_helpers(interpret)

    def body(k_ref, qt_ref, do_ref, x_ref, b_ref, ek_ref, dv_ref, k_s, qt_s, do_s, x_s, b_s, ek_s, at_s, o_s, bars):
        bi, hi, ci, vi = (lax.axis_index(a) for a in ("b", "h", "c", "v"))
        gi = lax.div(hi, jnp.int32(rep))
        rows, cols = pl.ds(ci * c, c), pl.ds(vi * dvb, dvb)
        load_all(
            (
                (k_ref.at[bi, rows, gi, :], k_s),
                (qt_ref.at[bi, gi, :, rows], qt_s),
                (do_ref.at[bi, rows, hi, cols], do_s),
                (x_ref.at[bi, hi, ci, :, cols], x_s),
                (b_ref.at[bi, hi, rows], b_s),
                (ek_ref.at[bi, hi, rows], ek_s),
            ),
            bars,
        )
        scores = mm(k_s, qt_s, (c, c))  # [s, t] = k_s . q̂_t
        diff = lax.broadcast_in_dim(lc(b_s[...], COL), (c, c), [1]) - lax.broadcast_in_dim(
            lc(b_s[...], ROW), (c, c), [0]
        )  # b_t - b_s
        r_id, c_id = iota((c, c), 0), iota((c, c), 1)
        at_s[...] = jnp.where(c_id >= r_id, scores * jnp.exp(jnp.minimum(diff, 0.0)), 0.0).astype(BF16)
        plgpu.commit_smem()
        ekv = lax.broadcast_in_dim(lc(ek_s[...], ROW), (c, dvb), [0])
        dvv = mm(at_s, do_s, (c, dvb)) + mm(k_s, x_s, (c, dvb)) * ekv
        store_tile(dvv, o_s, dv_ref.at[bi, rows, hi, cols])

    scratch = [
        smem_tile((c, dk), BF16),
        smem_tile((dk, c), BF16),
        smem_tile((c, dvb), BF16),
        smem_tile((dk, dvb), BF16),
        plgpu.SMEM((c,), F32),
        plgpu.SMEM((c,), F32),
        smem_tile((c, c), BF16),
        smem_tile((c, dvb), F32),
        plgpu.Barrier(num_barriers=6),
    ]
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((bsz, t_len, heads, dv), F32),
        scratch_types=scratch,
        grid=(bsz, heads, n, nv),
        grid_names=("b", "h", "c", "v"),
        interpret=interpret,
        kernel_name="ssd_scan_bwd_dv",
    )
    return kernel(k, qt, do, x, b, ek)


def ssd_grads_dv_smem_bytes(chunk, dk, block_dv):
    c, dvb = chunk, block_dv
    return scratch_bytes(
        ((c, dk), BF16),
        ((dk, c), BF16),
        ((c, dvb), BF16),
        ((dk, dvb), BF16),
        ((c,), F32),
        ((c,), F32),
        ((c, c), BF16),
        ((c, dvb), F32),
        6,
    )


# --- B and C, vector gates -----------------------------------------------------------------------------------------


def gla_grads_dqk(qm, km, v, vt, do, dot, st, xt, fac, *, chunk: int, sub: int, block_dv: int, interpret=None):
    """dqm and dkm of the vector-gate scan (gradients with respect to the kernel's ``qm`` / ``km``).

    Args:
      qm, km: ``[B, T, H, Dk]`` bfloat16 (``prep_vector_gates``'s ``qm`` and the untransposed ``km``).
      v, do, vt, dot, st, xt: as in ``ssd_grads_dqk``. fac: ``[B, H, n, NF, Dk]`` float32 (``gla_factor_rows``).
    Returns:
      ``(dqm, dkm)``, each ``[Dv / block_dv, B, T, H, Dk]`` float32 partial sums over the Dv blocks.
    """
    bsz, t_len, heads, dk = qm.shape
    dv = v.shape[3]
    n, nv, n_sub = t_len // chunk, dv // block_dv, chunk // sub
    c, dvb, ell = chunk, block_dv, sub
    frows, nf = gla_factor_rows(n_sub)
    lc, _ = layout_helpers(interpret)
    iota1 = (
        (lambda layout: lax.broadcasted_iota(jnp.int32, (c,), 0))
        if interpret is not None
        else (lambda layout: plgpu.broadcasted_iota(jnp.int32, (c,), 0, layout=layout))
    )

    def body(
        qm_ref,
        km_ref,
        v_ref,
        vt_ref,
        do_ref,
        dot_ref,
        st_ref,
        xt_ref,
        f_ref,
        dq_ref,
        dk_ref,
        qm_s,
        km_s,
        v_s,
        vt_s,
        do_s,
        dot_s,
        st_s,
        xt_s,
        f_s,
        p_s,
        w_s,
        a_s,
        o_s,
        bars,
    ):
        bi, hi, ci, vi = (lax.axis_index(a) for a in ("b", "h", "c", "v"))
        rows, cols = pl.ds(ci * c, c), pl.ds(vi * dvb, dvb)
        load_all(
            (
                (qm_ref.at[bi, rows, hi, :], qm_s),
                (km_ref.at[bi, rows, hi, :], km_s),
                (v_ref.at[bi, rows, hi, cols], v_s),
                (vt_ref.at[bi, hi, cols, rows], vt_s),
                (do_ref.at[bi, rows, hi, cols], do_s),
                (dot_ref.at[bi, hi, cols, rows], dot_s),
                (st_ref.at[bi, hi, ci, cols, :], st_s),
                (xt_ref.at[bi, hi, ci, cols, :], xt_s),
                (f_ref.at[bi, hi, ci], f_s),
            ),
            bars,
        )
        colv = lambda r: lambda: lax.broadcast_in_dim(lc(f_s[r], COL), (c, dk), [1])  # factor per key column
        # Register budget (one warpgroup, 255 per thread; a [C, Dk] float32 tile is 64): dA / dA^T wait in shared
        # memory (float32) instead of registers, the factors are applied one sub-chunk at a time (``scale_sub``:
        # one vector live, masks on 1-D token indices), and products without a factor accumulate into the running
        # sum by wgmma (``mm_acc``). ptxas -v: no spills at C = 64, Dk = 128, block_dv = 64.
        t_rows = iota1(ROW)  # token of each row of a [C, Dk] tile
        r_id = lax.broadcast_in_dim(t_rows, (c, c), [0])
        c_id = lax.broadcast_in_dim(iota1(COL), (c, c), [1])
        r_sub, c_sub = lax.div(r_id, ell), lax.div(c_id, ell)
        scale = lambda x, vecs: scale_sub(x, t_rows, 0, vecs, ell)
        a_s[...] = mm(do_s, vt_s, (c, c))  # dA[t, s]
        plgpu.commit_smem()  # a_s and o_s are read back by element-wise code whose layout need not match the write

        # dqm, summed in the float32 output tile in shared memory (one [C, Dk] tile in registers at a time): the
        # inter-chunk term, the diagonal blocks (no factor; accumulated by wgmma), the earlier sub-chunks j of every
        # row (factor qoff[i, j] after the product)
        o_s[...] = scale(mm(do_s, st_s, (c, dk)), [colv(r) for r in frows["inter"]])
        p_s[...] = jnp.where((r_id >= c_id) & (r_sub == c_sub), a_s[...], 0.0).astype(BF16)
        plgpu.commit_smem()
        o_s[...] = mm_acc(o_s[...], p_s, km_s, interpret)
        if n_sub > 1:
            w_s[...] = scale(km_s[...].astype(F32), [colv(r) for r in frows["koff"]]).astype(BF16)
        for j in range(n_sub - 1):
            p_s[...] = jnp.where((c_sub == j) & (r_sub > j), a_s[...], 0.0).astype(BF16)
            plgpu.commit_smem()
            part = scale(mm(p_s, w_s, (c, dk)), [colv(frows["qoff"][i, j]) if i > j else None for i in range(n_sub)])
            o_s[...] = o_s[...] + part
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, dq_ref.at[vi, bi, rows, hi, :])
        plgpu.wait_smem_to_gmem(0)  # o_s is reused for dkm

        # dkm: the later sub-chunks of every row s (one wgmma per row sub-chunk j, P restricted to the rows of j, so
        # all accumulate into one tile; factor koff[j] after), the diagonal blocks, the state term
        a_s[...] = mm(v_s, dot_s, (c, c))  # dA^T[s, t]
        plgpu.commit_smem()
        dkm = None
        for j in range(n_sub - 1):
            p_s[...] = jnp.where((c_sub > r_sub) & (r_sub == j), a_s[...], 0.0).astype(BF16)
            w_s[...] = scale(
                qm_s[...].astype(F32), [colv(frows["qoff"][i, j]) if i > j else None for i in range(n_sub)]
            ).astype(BF16)
            plgpu.commit_smem()
            dkm = mm(p_s, w_s, (c, dk)) if dkm is None else mm_acc(dkm, p_s, w_s, interpret)
        if dkm is not None:
            dkm = scale(dkm, [colv(r) for r in frows["koff"]])
        p_s[...] = jnp.where((c_id >= r_id) & (r_sub == c_sub), a_s[...], 0.0).astype(BF16)
        plgpu.commit_smem()
        dkm = mm(p_s, qm_s, (c, dk)) if dkm is None else mm_acc(dkm, p_s, qm_s, interpret)
        dkm = dkm + scale(mm(v_s, xt_s, (c, dk)), [colv(r) for r in frows["kstate"]])
        store_tile(dkm, o_s, dk_ref.at[vi, bi, rows, hi, :])

    scratch = [
        smem_tile((c, dk), BF16),
        smem_tile((c, dk), BF16),  # qm, km
        smem_tile((c, dvb), BF16),
        smem_tile((dvb, c), BF16),  # v, v^T
        smem_tile((c, dvb), BF16),
        smem_tile((dvb, c), BF16),  # dO, dO^T
        smem_tile((dvb, dk), BF16),
        smem_tile((dvb, dk), BF16),  # S^T, X^T
        plgpu.SMEM((nf, dk), F32),  # gate-factor table
        smem_tile((c, c), BF16),  # masked dA / dA^T (rewritten per wgmma)
        smem_tile((c, dk), BF16),  # km ⊙ koff, then qm ⊙ qoff (rewritten per wgmma)
        smem_tile((c, c), F32),  # dA, then dA^T
        smem_tile((c, dk), F32),  # output tile (dqm, then dkm)
        plgpu.Barrier(num_barriers=9),
    ]
    out = jax.ShapeDtypeStruct((nv, bsz, t_len, heads, dk), F32)
    kernel = plgpu.kernel(
        body,
        out_type=(out, out),
        scratch_types=scratch,
        grid=(bsz, heads, n, nv),
        grid_names=("b", "h", "c", "v"),
        interpret=interpret,
        kernel_name="gla_scan_bwd_dqk",
    )
    return kernel(qm, km, v, vt, do, dot, st, xt, fac)


def gla_grads_dqk_smem_bytes(chunk, sub, dk, block_dv):
    c, dvb, nf = chunk, block_dv, gla_factor_rows(chunk // sub)[1]
    return scratch_bytes(
        ((c, dk), BF16),
        ((c, dk), BF16),
        ((c, dvb), BF16),
        ((dvb, c), BF16),
        ((c, dvb), BF16),
        ((dvb, c), BF16),
        ((dvb, dk), BF16),
        ((dvb, dk), BF16),
        ((nf, dk), F32),
        ((c, c), BF16),
        ((c, dk), BF16),
        ((c, c), F32),
        ((c, dk), F32),
        9,
    )


def gla_grads_dv(km, qmt, do, x, fac, *, chunk: int, sub: int, block_dv: int, interpret=None):
    """dv of the vector-gate scan: ``dv = A^T dO + (km ⊙ kstate) X``.

    Args:
      km: ``[B, T, H, Dk]`` bfloat16; qmt: ``[B, H, Dk, T]`` bfloat16 (qm transposed); do: ``[B, T, H, Dv]``
      bfloat16; x: ``[B, H, n, Dk, Dv]`` bfloat16 (``X_c``); fac: ``[B, H, n, NF, Dk]`` float32.
    Returns:
      ``dv [B, T, H, Dv]`` float32.
    """
    bsz, t_len, heads, dk = km.shape
    dv = do.shape[3]
    n, nv, n_sub = t_len // chunk, dv // block_dv, chunk // sub
    c, dvb, ell = chunk, block_dv, sub
    frows, nf = gla_factor_rows(n_sub)
    lc, _ = layout_helpers(interpret)
    iota1 = (
        (lambda layout: lax.broadcasted_iota(jnp.int32, (c,), 0))
        if interpret is not None
        else (lambda layout: plgpu.broadcasted_iota(jnp.int32, (c,), 0, layout=layout))
    )

    def body(km_ref, qmt_ref, do_ref, x_ref, f_ref, dv_ref, km_s, qmt_s, do_s, x_s, f_s, kw_s, qw_s, at_s, o_s, bars):
        bi, hi, ci, vi = (lax.axis_index(a) for a in ("b", "h", "c", "v"))
        rows, cols = pl.ds(ci * c, c), pl.ds(vi * dvb, dvb)
        load_all(
            (
                (km_ref.at[bi, rows, hi, :], km_s),
                (qmt_ref.at[bi, hi, :, rows], qmt_s),
                (do_ref.at[bi, rows, hi, cols], do_s),
                (x_ref.at[bi, hi, ci, :, cols], x_s),
                (f_ref.at[bi, hi, ci], f_s),
            ),
            bars,
        )
        colv = lambda r: lambda: lax.broadcast_in_dim(lc(f_s[r], COL), (c, dk), [1])  # per key column, [C, Dk]
        rowv = lambda r: lambda: lax.broadcast_in_dim(lc(f_s[r], ROW), (dk, c), [0])  # per key row, [Dk, C]
        # Registers: as in ``gla_grads_dqk`` (1-D token indices, one factor at a time, products accumulated by wgmma).
        s_rows, t_cols = iota1(ROW), iota1(COL)  # token of each km row / qm^T column
        r_id = lax.broadcast_in_dim(s_rows, (c, c), [0])
        c_id = lax.broadcast_in_dim(t_cols, (c, c), [1])
        r_sub, c_sub = lax.div(r_id, ell), lax.div(c_id, ell)
        # A^T[s, t]: diagonal blocks as they are (both referred to the block's middle row); dropped entries may be
        # inf, where() selects
        at = jnp.where((c_id >= r_id) & (r_sub == c_sub), mm(km_s, qmt_s, (c, c)), 0.0)
        for j in range(n_sub - 1):  # rows s of sub-chunk j (k side zero elsewhere) against the later columns t
            fk = [colv(frows["koff"][j]) if i == j else None for i in range(n_sub)]
            kw_s[...] = scale_sub(km_s[...].astype(F32), s_rows, 0, fk, ell).astype(BF16)
            fq = [rowv(frows["qoff"][i, j]) if i > j else None for i in range(n_sub)]
            qw_s[...] = scale_sub(qmt_s[...].astype(F32), t_cols, 1, fq, ell).astype(BF16)
            plgpu.commit_smem()
            at = mm_acc(at, kw_s, qw_s, interpret)
        at_s[...] = at.astype(BF16)
        fk = [colv(r) for r in frows["kstate"]]
        kw_s[...] = scale_sub(km_s[...].astype(F32), s_rows, 0, fk, ell).astype(BF16)
        plgpu.commit_smem()
        dvv = mm2(at_s, do_s, kw_s, x_s, (c, dvb))
        store_tile(dvv, o_s, dv_ref.at[bi, rows, hi, cols])

    scratch = [
        smem_tile((c, dk), BF16),
        smem_tile((dk, c), BF16),
        smem_tile((c, dvb), BF16),
        smem_tile((dk, dvb), BF16),
        plgpu.SMEM((nf, dk), F32),
        smem_tile((c, dk), BF16),  # km ⊙ koff, then km ⊙ kstate
        smem_tile((dk, c), BF16),  # qm^T ⊙ qoff (rewritten per wgmma)
        smem_tile((c, c), BF16),  # A^T
        smem_tile((c, dvb), F32),  # output tile
        plgpu.Barrier(num_barriers=5),
    ]
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((bsz, t_len, heads, dv), F32),
        scratch_types=scratch,
        grid=(bsz, heads, n, nv),
        grid_names=("b", "h", "c", "v"),
        interpret=interpret,
        kernel_name="gla_scan_bwd_dv",
    )
    return kernel(km, qmt, do, x, fac)


def gla_grads_dv_smem_bytes(chunk, sub, dk, block_dv):
    c, dvb, nf = chunk, block_dv, gla_factor_rows(chunk // sub)[1]
    return scratch_bytes(
        ((c, dk), BF16),
        ((dk, c), BF16),
        ((c, dvb), BF16),
        ((dk, dvb), BF16),
        ((nf, dk), F32),
        ((c, dk), BF16),
        ((dk, c), BF16),
        ((c, c), BF16),
        ((c, dvb), F32),
        5,
    )


# --- XLA glue ------------------------------------------------------------------------------------------------------


def _tr(a):
    """``[B, T, H, D]`` -> ``[B, H, D, T]``."""
    return jnp.transpose(a, (0, 2, 3, 1))


def _gate_grad(db, s_states, s_final, x_states, chunk):
    """Raw-gate gradient from the cumulative-gate gradient ``db [B, T, H, X]`` (q̂ ⊙ dq̂ - k ⊙ dk, X = Dk or 1):
    adds ``Σ_v S_{c+1} ⊙ X_c`` on each chunk's last row (summed over Dk when X = 1) and reverse-sums inside each
    chunk. s_states, x_states: ``[B, H, n, Dk, Dv]`` (bfloat16); s_final: ``[B, H, Dk, Dv]`` float32."""
    bsz, t_len, heads, width = db.shape
    n = t_len // chunk
    s_next = jnp.concatenate([s_states[:, :, 1:].astype(F32), s_final[:, :, None]], axis=2)
    last = jnp.sum(s_next * x_states.astype(F32), axis=-1)  # [B, H, n, Dk]
    if width == 1:
        last = jnp.sum(last, axis=-1, keepdims=True)
    dbc = db.reshape(bsz, n, chunk, heads, width)
    dbc = dbc.at[:, :, chunk - 1].add(jnp.moveaxis(last, 2, 1))
    return jnp.flip(jnp.cumsum(jnp.flip(dbc, 2), axis=2), 2).reshape(db.shape)


def vector_scan_bwd(q, k, v, g, s0, do, dsf, *, scale, chunk, sub, block_dv, interpret):
    """Backward of ``gpu.vector_scan`` on the kernels above. Returns float32 ``(dq, dk, dv, dg, ds0)``."""
    bsz, t_len, heads, dk = q.shape
    n, n_sub, ell = t_len // chunk, chunk // sub, sub
    b = jnp.cumsum(g.astype(F32).reshape(bsz, n, chunk, heads, dk), axis=2)
    b_last = b[:, :, -1]  # [B, n, H, Dk]
    bs = b.reshape(bsz, n, n_sub, ell, heads, dk)
    m = bs[:, :, :, (ell - 1) // 2]  # the forward's sub-chunk reference rows
    rel = (bs - m[:, :, :, None]).reshape(q.shape)  # b_t - m_i
    bflat = b.reshape(q.shape)
    qh = q.astype(F32) * scale
    kf = k.astype(F32)
    qm, kmt, fac = prep_vector_gates(q, k, g, scale=scale, chunk=chunk, sub=sub)
    km = jnp.transpose(kmt, (0, 3, 1, 2))  # [B, T, H, Dk]
    dec = jnp.moveaxis(jnp.exp(b_last), 2, 1)  # [B, H, n, Dk]
    v16, do16 = v.astype(BF16), do.astype(BF16)
    run = functools.partial(state_pass, chunk=chunk, block_dv=block_dv, interpret=interpret)
    lt_f = _tr(kf * jnp.exp(jnp.repeat(b_last, chunk, axis=1) - bflat)).astype(BF16)
    s_states, s_final = run(lt_f, v16, dec, s0, reverse=False)
    lt_r = _tr(qh * jnp.exp(bflat)).astype(BF16)
    x_states, ds0 = run(lt_r, do16, dec, dsf.astype(F32), reverse=True)
    st, xt = jnp.swapaxes(s_states, 3, 4), jnp.swapaxes(x_states, 3, 4)
    dqm, dkm = gla_grads_dqk(
        qm,
        km,
        v16,
        _tr(v16),
        do16,
        _tr(do16),
        st,
        xt,
        fac,
        chunk=chunk,
        sub=sub,
        block_dv=block_dv,
        interpret=interpret,
    )
    dqm, dkm = jnp.sum(dqm, axis=0), jnp.sum(dkm, axis=0)
    dv = gla_grads_dv(km, _tr(qm), do16, x_states, fac, chunk=chunk, sub=sub, block_dv=block_dv, interpret=interpret)
    # q̂ ⊙ dq̂ = qm ⊙ dqm and k ⊙ dk = km ⊙ dkm, with the bfloat16 qm / km the kernels multiplied with
    db = qm.astype(F32) * dqm - km.astype(F32) * dkm
    dg = _gate_grad(db, s_states, s_final, x_states, chunk)
    dq = dqm * (scale * jnp.exp(rel))
    dkk = dkm * jnp.exp(-rel)
    return dq, dkk, dv, dg, ds0


def scalar_scan_bwd(q, k, v, g, s0, do, dsf, *, chunk, block_dv, interpret):
    """Backward of ``gpu.scalar_scan`` on the kernels above (q, k per group, scale 1). Returns float32
    ``(dq, dk, dv, dg, ds0)``."""
    bsz, t_len, groups, dk = q.shape
    heads = v.shape[2]
    rep = heads // groups
    b, eb, ek, last = prep_gates(g, chunk)  # [B, H, T] x3, [B, H, n, 1]
    n = t_len // chunk
    dec = jnp.broadcast_to(last, (bsz, heads, n, dk))
    q16, k16, v16, do16 = q.astype(BF16), k.astype(BF16), v.astype(BF16), do.astype(BF16)
    per_head = lambda a: jnp.repeat(a, rep, axis=2) if rep > 1 else a
    qh, kh = per_head(q.astype(F32)), per_head(k.astype(F32))  # [B, T, H, Dk]
    run = functools.partial(state_pass, chunk=chunk, block_dv=block_dv, interpret=interpret)
    s_states, s_final = run((_tr(kh) * ek[:, :, None, :]).astype(BF16), v16, dec, s0, reverse=False)
    x_states, ds0 = run((_tr(qh) * eb[:, :, None, :]).astype(BF16), do16, dec, dsf.astype(F32), reverse=True)
    st, xt = jnp.swapaxes(s_states, 3, 4), jnp.swapaxes(x_states, 3, 4)
    dqh, dkh = ssd_grads_dqk(
        q16,
        k16,
        v16,
        _tr(v16),
        do16,
        _tr(do16),
        st,
        xt,
        b,
        eb,
        ek,
        chunk=chunk,
        block_dv=block_dv,
        rep=rep,
        interpret=interpret,
    )
    dqh, dkh = jnp.sum(dqh, axis=0), jnp.sum(dkh, axis=0)  # [B, T, H, Dk] per head
    dv = ssd_grads_dv(
        k16, _tr(q16), do16, x_states, b, ek, chunk=chunk, block_dv=block_dv, rep=rep, interpret=interpret
    )
    db = jnp.sum(per_head(q16.astype(F32)) * dqh - per_head(k16.astype(F32)) * dkh, axis=-1, keepdims=True)
    dg = _gate_grad(db, s_states, s_final, x_states, chunk)[..., 0]  # [B, T, H]
    group_sum = lambda a: a.reshape(bsz, t_len, groups, rep, dk).sum(axis=3)
    return group_sum(dqh), group_sum(dkh), dv, dg, ds0
