"""Mosaic GPU (Hopper, wgmma) forward kernels of the chunked scan: ``ssd_scan_fwd`` for *scalar* per-head gates
(Mamba2 SSD) and ``gla_scan_fwd`` for *vector* gates (GLA, one log-gate per key channel; described at the end), the
XLA-side preparation of their gate operands, and their shared-memory sizes. The custom VJPs that pair them with the
backward kernels of ``gpu_bwd`` are in ``gpu``.

Per (batch, head, Dv-block) one CTA (one warpgroup) walks the chunks of the sequence in a ``fori_loop`` carrying its
slice of the state ``S [Dk, block_dv]`` (float32) in registers (WGMMA layout). Per chunk of ``C`` tokens, with
``b`` the chunk-local cumulative log-gates (float32, computed by XLA outside the kernel):

* ``P = (Q K^T) * exp(b_t - b_s) [t >= s]``           (wgmma ``[C, Dk] x [Dk, C]``; mask and decay in registers)
* ``O = exp(b_t) * (Q S) + P V``                        (two wgmma: ``[C, Dk] x [Dk, dv]`` and ``[C, C] x [C, dv]``)
* ``S <- exp(b_C) S + K^T (exp(b_C - b_s) * V)``         (wgmma ``[Dk, C] x [C, dv]``)

Every exponent is a non-positive difference (``b`` is non-increasing down a chunk). wgmma operands are bfloat16
(inputs are cast; the state and ``P`` are rounded to bfloat16 for their matmuls), accumulation is float32.
``K`` arrives pre-transposed ``[B, G, Dk, T]`` (one XLA transpose of K) so that no wgmma operand needs a transposed
shared-memory view: both the ``Q K^T`` right operand and the ``K^T V`` left operand are plain ``[Dk, C]`` tiles.
The gate factors ``exp(b)``, ``exp(b_C - b)`` and ``exp(b_C)`` are also XLA-side (float32 vectors, tiny).

Everything goes through shared memory by TMA (``copy_gmem_to_smem``); the chunk operands are double-buffered
(``gpu_common.double_buffered``: the copies of chunk ``c + 1`` are issued before chunk ``c`` is computed). Otherwise
untuned: one warpgroup per CTA, synchronous wgmma, the output tile's store is waited for at every chunk.

Vector gates (``gla_scan_fwd``, same CTA/state/double-buffering design). ``b [C, Dk]`` now has one column per key
channel, so the decay ``exp(b_t - b_s)`` of the intra-chunk scores differs per channel and cannot be applied to
``Q K^T`` after the matmul. The chunk is split into sub-chunks of ``L`` tokens (``gcd(chunk, BlockSizes.sub_chunk)``,
16 by default) and every token is referred to the *middle row* ``m_i`` of its own sub-chunk ``i`` (XLA-side):
``qm_t = scale q_t exp(b_t - m_i)``, ``km_s = k_s exp(m_j - b_s)`` (bfloat16). Then

* diagonal blocks (t, s in one sub-chunk, t >= s): ``A = qm km^T`` as it is (one wgmma for all sub-chunks; the
  entries of other sub-chunks and t < s are dropped with ``where``, which selects and so also drops an inf);
* sub-chunk pairs j < i: ``A += (qm_i exp(m_i - e_j)) (km_j exp(e_j - m_j))^T`` with ``e_j`` the last row of
  sub-chunk j, both factors ``<= 1``; one wgmma per j (rows of sub-chunks <= j zeroed, columns kept in sub-chunk j);
* ``O = (qm exp(m_i)) S + A V`` and ``S <- exp(b_C) ⊙ S + (km exp(b_C - m_j))^T V`` (the decay is per key row).

All factors ``exp(m_i)``, ``exp(m_i - e_j)``, ``exp(e_j - m_j)``, ``exp(b_C - m_j)``, ``exp(b_C)`` are exponentials
of non-positive differences, computed by XLA in float32 as a small per-chunk table ``[NF, Dk]`` (NF = 19 for 4
sub-chunks). The only exponents that can be positive are those inside ``qm`` / ``km``, and they are bounded by the
log-gate total of *half a sub-chunk* (at most 8 tokens at L = 16) in each channel: float32/bfloat16 (exponent range
about ±87) hold them as long as that total stays above about -87, i.e. log-gates above about -10 per token on
average over 8 tokens (tested with gates down to -5 per token, and by hand at -10). Beyond that a diagonal-block
product would underflow/overflow (a larger ``sub_chunk`` narrows the range: the bound is over ``L / 2`` tokens).
Per chunk: 1 + 1 + (n_sub - 1) + 1 + 1 wgmma (inter, diagonal, pairs, ``A V``, state update) = 7 at C = 64, L = 16.
Shared memory at C = 64, Dk = 128, block_dv = 64: 199,680 bytes of scratch (207,872 with a float32 output tile)
plus 72 bytes of barriers, under the H100's 232,448 (``gla_smem_bytes``); block_dv = 128 would need 273,408 and
does not lower. The backward (``gpu_bwd``) reuses ``qm``, ``km`` and the factor table in its dq/dk and dv kernels;
``gpu_reference`` has the same factorisation in plain XLA.
"""

from __future__ import annotations

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
    mm,
    mm2,
    mm_acc,
    pipeline_barriers,
    scale_sub,
    scratch_bytes,
    smem_tile,
)


def ssd_scan_fwd(
    q, kt, v, b, eb, ek, sdec, s0, *, chunk: int, block_dv: int, rep: int = 1, out_dtype=jnp.bfloat16, interpret=None
):
    """Scalar-gate chunked scan, forward.

    Args:
      q: ``[B, T, G, Dk]`` bfloat16 (queries; SSD's C). kt: ``[B, G, Dk, T]`` bfloat16 (keys transposed; SSD's B).
        Head ``h`` reads group ``h // rep``.
      v: ``[B, T, H, Dv]`` bfloat16 (SSD's dt*x).
      b: ``[B, H, T]`` float32 chunk-local cumulative log-gates (non-increasing within each chunk, <= 0).
      eb: ``exp(b)``; ek: ``exp(b_C - b)`` (``b_C`` the chunk's last value), both ``[B, H, T]`` float32.
      sdec: ``[B, H, T // chunk, Dk]`` float32, ``exp(b_C)`` of each chunk broadcast over Dk.
      s0: ``[B, H, Dk, Dv]`` float32 initial state.
      chunk: C, a multiple of 64 dividing T. block_dv: Dv columns per CTA (multiple of 64, divides Dv).
      out_dtype: dtype of ``o`` (bfloat16 or float32).
    Returns:
      ``(o [B, T, H, Dv] out_dtype, S [B, H, Dk, Dv] float32)``.
    """
    bsz, t_len, groups, dk = q.shape
    heads, dv = v.shape[2], v.shape[3]
    n = t_len // chunk
    nv = dv // block_dv
    c, dvb = chunk, block_dv
    bf16, f32 = jnp.bfloat16, jnp.float32
    # Register layouts are a lowering annotation with identity semantics; the Mosaic GPU interpreter of jax 0.10.2
    # has no rule for ``layout_cast`` (nor layout-annotated iotas), so interpret mode leaves them out.
    lc = (lambda x, layout: x) if interpret is not None else plgpu.layout_cast
    iota = (
        (lambda d: lax.broadcasted_iota(jnp.int32, (c, c), d))
        if interpret is not None
        else (lambda d: plgpu.broadcasted_iota(jnp.int32, (c, c), d, layout=WG))
    )

    def body(
        q_ref,
        kt_ref,
        v_ref,
        b_ref,
        eb_ref,
        ek_ref,
        sd_ref,
        s0_ref,
        o_ref,
        sf_ref,
        q_s,
        kt_s,
        v_s,
        vd_s,
        p_s,
        s16_s,
        s32_s,
        o_s,
        b_s,
        eb_s,
        ek_s,
        sd_s,
        bars,
    ):
        bi, hi, vi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
        gi = lax.div(hi, jnp.int32(rep))
        cols = pl.ds(vi * dvb, dvb)

        def sources(ci):
            rows = pl.ds(ci * c, c)
            return (
                q_ref.at[bi, rows, gi, :],
                kt_ref.at[bi, gi, :, rows],
                v_ref.at[bi, rows, hi, cols],
                b_ref.at[bi, hi, rows],
                eb_ref.at[bi, hi, rows],
                ek_ref.at[bi, hi, rows],
                sd_ref.at[bi, hi, ci, :],
            )

        start, acquire = double_buffered((q_s, kt_s, v_s, b_s, eb_s, ek_s, sd_s), bars, sources, n)
        start(s0_ref.at[bi, hi, :, cols], s32_s)
        st = lc(s32_s[...], WG)

        def step(ci, st):
            rows = pl.ds(ci * c, c)
            q_s, kt_s, v_s, b_s, eb_s, ek_s, sd_s = acquire(ci)
            # the state entering the chunk, rounded for the Q S wgmma
            s16_s[...] = st.astype(bf16)
            # intra-chunk scores with the causal decay mask
            scores = mm(q_s, kt_s, (c, c))
            bt = lc(b_s[...], ROW)
            bs = lc(b_s[...], COL)
            diff = lax.broadcast_in_dim(bt, (c, c), [0]) - lax.broadcast_in_dim(bs, (c, c), [1])
            r_id, c_id = iota(0), iota(1)
            # kept entries (t >= s) have diff <= 0; the masked ones (t < s) would be positive, so minimum() keeps the
            # exp finite before where() drops them
            p = jnp.where(r_id >= c_id, scores * jnp.exp(jnp.minimum(diff, 0.0)), 0.0)
            p_s[...] = p.astype(bf16)
            # values decayed to the end of the chunk, for the state update
            ekv = lc(ek_s[...], ROW)
            vd = v_s[...].astype(f32) * lax.broadcast_in_dim(ekv, (c, dvb), [0])
            vd_s[...] = vd.astype(bf16)
            plgpu.commit_smem()  # register -> shared-memory stores visible to wgmma
            inter = mm(q_s, s16_s, (c, dvb))
            intra = mm(p_s, v_s, (c, dvb))
            ebv = lc(eb_s[...], ROW)
            out = inter * lax.broadcast_in_dim(ebv, (c, dvb), [0]) + intra
            o_s[...] = out.astype(o_s.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[bi, rows, hi, cols])
            upd = mm(kt_s, vd_s, (dk, dvb))
            sdv = lc(sd_s[...], ROW)
            st = st * lax.broadcast_in_dim(sdv, (dk, dvb), [0]) + upd
            plgpu.wait_smem_to_gmem(0)  # o_s is rewritten by the next chunk
            return st

        st = lax.fori_loop(0, n, step, st)
        s32_s[...] = st
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s32_s, sf_ref.at[bi, hi, :, cols])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        smem_tile((2, c, dk), bf16),  # q (two buffers: chunk ci + 1 is copied in while chunk ci is computed)
        smem_tile((2, dk, c), bf16),  # k^T
        smem_tile((2, c, dvb), bf16),  # v
        smem_tile((c, dvb), bf16),  # decayed v
        smem_tile((c, c), bf16),  # P
        smem_tile((dk, dvb), bf16),  # state, bf16 copy
        smem_tile((dk, dvb), f32),  # state, f32 (initial / final)
        smem_tile((c, dvb), out_dtype),  # output tile
        plgpu.SMEM((2, c), f32),
        plgpu.SMEM((2, c), f32),
        plgpu.SMEM((2, c), f32),
        plgpu.SMEM((2, dk), f32),
        plgpu.Barrier(num_barriers=pipeline_barriers(7)),
    ]
    kernel = plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((bsz, t_len, heads, dv), out_dtype),
            jax.ShapeDtypeStruct((bsz, heads, dk, dv), f32),
        ),
        scratch_types=scratch,
        grid=(bsz, heads, nv),
        grid_names=("b", "h", "v"),
        interpret=interpret,
        kernel_name="ssd_scan_fwd_wgmma",
    )
    return kernel(q, kt, v, b, eb, ek, sdec, s0)


def ssd_fwd_smem_bytes(chunk, dk, block_dv, out_dtype=jnp.bfloat16):
    """Shared memory of ``ssd_scan_fwd`` (bytes, barriers included, as Mosaic GPU allocates it)."""
    c, dvb, bf16, f32 = chunk, block_dv, jnp.bfloat16, jnp.float32
    return scratch_bytes(
        ((2, c, dk), bf16),
        ((2, dk, c), bf16),
        ((2, c, dvb), bf16),
        ((c, dvb), bf16),
        ((c, c), bf16),
        ((dk, dvb), bf16),
        ((dk, dvb), f32),
        ((c, dvb), out_dtype),
        ((2, c), f32),
        ((2, c), f32),
        ((2, c), f32),
        ((2, dk), f32),
        2 * 7 + 1,
    )


def prep_gates(g, chunk):
    """g: ``[B, T, H]`` raw scalar log-gates (T a multiple of chunk) -> the kernel's float32 gate operands."""
    bsz, t_len, heads = g.shape
    b = jnp.cumsum(jnp.swapaxes(g.astype(jnp.float32), 1, 2).reshape(bsz, heads, t_len // chunk, chunk), axis=-1)
    b_last = b[..., -1:]
    flat = lambda a: a.reshape(bsz, heads, t_len)
    return flat(b), flat(jnp.exp(b)), flat(jnp.exp(b_last - b)), jnp.exp(b_last)  # last: [B, H, n, 1]


def gla_factor_rows(n_sub):
    """Row index of each float32 gate-factor vector (length Dk) in the per-chunk table ``F [NF, Dk]`` of the
    vector-gate kernel. With ``m_i`` the chunk-local cumulative log-gates at the middle row of sub-chunk ``i``,
    ``e_j`` at the last row of sub-chunk ``j`` and ``b_C`` at the chunk's last row (all non-increasing down the
    chunk, so every factor below is ``exp`` of a non-positive difference, <= 1):

    * ``inter[i] = exp(m_i)``: turns ``qm`` rows of sub-chunk i into ``q exp(b_t)`` (inter-chunk term);
    * ``qoff[i, j] = exp(m_i - e_j)`` (j < i) and ``koff[j] = exp(e_j - m_j)``: ``qm`` of sub-chunk i against
      ``km`` of an earlier sub-chunk j, split at the end of sub-chunk j;
    * ``kstate[j] = exp(b_C - m_j)``: turns ``km`` into ``k exp(b_C - b_s)`` (state update);
    * ``decay = exp(b_C)``: the per-key-row decay of the state over the chunk.
    """
    rows, r = {}, 0
    for name, count in (("inter", n_sub), ("koff", n_sub), ("kstate", n_sub), ("decay", 1)):
        rows[name] = list(range(r, r + count))
        r += count
    rows["qoff"] = {}
    for i in range(n_sub):
        for j in range(i):
            rows["qoff"][i, j] = r
            r += 1
    return rows, r


def prep_vector_gates(q, k, g, *, scale, chunk, sub):
    """XLA-side operands of ``gla_scan_fwd`` (float32 math, one pass over q, k, g).

    q, k, g: ``[B, T, H, Dk]`` (T a multiple of chunk; g raw log-gates). Returns ``qm [B, T, H, Dk]`` bfloat16
    (``scale q_t exp(b_t - m_i)``), ``km^T [B, H, Dk, T]`` bfloat16 (``k_s exp(m_j - b_s)``), both referred to the
    middle row of the token's own sub-chunk, and ``F [B, H, T / chunk, NF, Dk]`` float32 (``gla_factor_rows``)."""
    bsz, t_len, heads, dk = q.shape
    n, n_sub, ell = t_len // chunk, chunk // sub, sub
    f32 = jnp.float32
    b = jnp.cumsum(g.astype(f32).reshape(bsz, n, chunk, heads, dk), axis=2).reshape(bsz, n, n_sub, ell, heads, dk)
    e = b[:, :, :, ell - 1]  # [B, n, n_sub, H, Dk]: last row of each sub-chunk
    m = b[:, :, :, (ell - 1) // 2]  # middle row: splits each diagonal block's exponent range in two halves
    b_last = e[:, :, -1]  # [B, n, H, Dk]
    qm = (q.astype(f32) * scale).reshape(b.shape) * jnp.exp(b - m[:, :, :, None])
    km = k.astype(f32).reshape(b.shape) * jnp.exp(m[:, :, :, None] - b)
    rows, nf = gla_factor_rows(n_sub)
    table = [None] * nf
    for i in range(n_sub):
        table[rows["inter"][i]] = jnp.exp(m[:, :, i])
        table[rows["koff"][i]] = jnp.exp(e[:, :, i] - m[:, :, i])
        table[rows["kstate"][i]] = jnp.exp(b_last - m[:, :, i])
        for j in range(i):
            table[rows["qoff"][i, j]] = jnp.exp(m[:, :, i] - e[:, :, j])
    table[rows["decay"][0]] = jnp.exp(b_last)
    fac = jnp.moveaxis(jnp.stack(table, axis=2), 3, 1)  # [B, H, n, NF, Dk]
    qm = qm.reshape(bsz, t_len, heads, dk).astype(jnp.bfloat16)
    kmt = jnp.transpose(km.reshape(bsz, t_len, heads, dk), (0, 2, 3, 1)).astype(jnp.bfloat16)
    return qm, kmt, fac


def gla_scan_fwd(qm, kmt, v, fac, s0, *, chunk: int, sub: int, block_dv: int, out_dtype=jnp.bfloat16, interpret=None):
    """Vector-gate (GLA) chunked scan, forward, on the operands of ``prep_vector_gates``.

    Args:
      qm: ``[B, T, H, Dk]`` bfloat16; kmt: ``[B, H, Dk, T]`` bfloat16; v: ``[B, T, H, Dv]`` bfloat16;
      fac: ``[B, H, T // chunk, NF, Dk]`` float32 gate-factor table; s0: ``[B, H, Dk, Dv]`` float32 initial state.
      chunk: C (multiple of 64 dividing T); sub: L, sub-chunk (divides C); block_dv: Dv columns per CTA.
    Returns:
      ``(o [B, T, H, Dv] out_dtype, S [B, H, Dk, Dv] float32)``.
    """
    bsz, t_len, heads, dk = qm.shape
    dv = v.shape[3]
    n, nv, n_sub = t_len // chunk, dv // block_dv, chunk // sub
    c, dvb, ell = chunk, block_dv, sub
    rows, nf = gla_factor_rows(n_sub)
    bf16, f32 = jnp.bfloat16, jnp.float32
    lc = (lambda x, layout: x) if interpret is not None else plgpu.layout_cast  # see ssd_scan_fwd
    iota1 = (
        (lambda layout: lax.broadcasted_iota(jnp.int32, (c,), 0))
        if interpret is not None
        else (lambda layout: plgpu.broadcasted_iota(jnp.int32, (c,), 0, layout=layout))
    )

    def body(
        qm_ref,
        kmt_ref,
        v_ref,
        f_ref,
        s0_ref,
        o_ref,
        sf_ref,
        q_s,
        kt_s,
        v_s,
        f_s,
        qw_s,
        kw_s,
        p_s,
        s16_s,
        s32_s,
        o_s,
        bars,
    ):
        bi, hi, vi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
        cols = pl.ds(vi * dvb, dvb)

        def sources(ci):
            rws = pl.ds(ci * c, c)
            return (
                qm_ref.at[bi, rws, hi, :],
                kmt_ref.at[bi, hi, :, rws],
                v_ref.at[bi, rws, hi, cols],
                f_ref.at[bi, hi, ci],
            )

        start, acquire = double_buffered((q_s, kt_s, v_s, f_s), bars, sources, n)
        start(s0_ref.at[bi, hi, :, cols], s32_s)
        st = lc(s32_s[...], WG)

        def step(ci, st):
            rws = pl.ds(ci * c, c)
            q_c, kt_c, v_c, f_c = acquire(ci)
            colv = lambda r: lax.broadcast_in_dim(lc(f_c[r], COL), (c, dk), [1])  # factor per key column d
            rowv = lambda r: lax.broadcast_in_dim(lc(f_c[r], ROW), (dk, c), [0])  # factor per key row d
            q_rows = iota1(ROW)  # token of each qm row
            k_cols = iota1(COL)  # token of each km^T column
            r_id = lax.broadcast_in_dim(q_rows, (c, c), [0])
            c_id = lax.broadcast_in_dim(k_cols, (c, c), [1])
            # Register budget (one warpgroup, 255 registers per thread): the carried state alone takes 64, one
            # factor vector broadcast over the tile 32. So q and k are re-read from shared memory at each use
            # instead of being kept as float32 values, each wgmma operand is built and stored before the next is
            # started, the factors are applied one sub-chunk at a time (one vector live, not n_sub), and every
            # product that adds to a live value accumulates into it by wgmma (``pl.run_state`` on an initialised
            # accumulator) instead of materialising a second tile.
            qside = lambda r: lambda: colv(r)
            kside = lambda r: lambda: rowv(r)
            s16_s[...] = st.astype(bf16)  # the state entering the chunk, rounded for the wgmma
            # diagonal blocks: qm km^T as it is (both referred to the same middle row), t >= s in one sub-chunk;
            # the entries dropped here (t < s, other sub-chunks) may be inf: where() selects, it never multiplies
            diag = mm(q_c, kt_c, (c, c))
            keep = (r_id >= c_id) & (lax.div(r_id, ell) == lax.div(c_id, ell))
            a = jnp.where(keep, diag, 0.0)
            # sub-chunk pairs j < i: (qm exp(m_i - e_j)) (km exp(e_j - m_j))^T. The q side is zero in the rows of
            # sub-chunks <= j and the k side zero outside the columns of sub-chunk j, so the product lands only in
            # the (i > j, columns j) blocks and is accumulated straight into ``a``.
            for j in range(n_sub - 1):
                fk = [kside(rows["koff"][j]) if i == j else None for i in range(n_sub)]
                kw_s[...] = scale_sub(kt_c[...].astype(f32), k_cols, 1, fk, ell).astype(bf16)
                fq = [qside(rows["qoff"][i, j]) if i > j else None for i in range(n_sub)]
                qw_s[...] = scale_sub(q_c[...].astype(f32), q_rows, 0, fq, ell).astype(bf16)
                plgpu.commit_smem()
                a = mm_acc(a, qw_s, kw_s, interpret)
            p_s[...] = a.astype(bf16)
            # O = (q exp(b_t)) S + P V, both into one accumulator
            fq = [qside(r) for r in rows["inter"]]
            qw_s[...] = scale_sub(q_c[...].astype(f32), q_rows, 0, fq, ell).astype(bf16)
            plgpu.commit_smem()
            o_s[...] = mm2(qw_s, s16_s, p_s, v_c, (c, dvb)).astype(o_s.dtype)
            # state update operand: (k exp(b_C - b_s))^T; S <- exp(b_C) S + that^T V, accumulated into the state
            fk = [kside(r) for r in rows["kstate"]]
            kw_s[...] = scale_sub(kt_c[...].astype(f32), k_cols, 1, fk, ell).astype(bf16)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[bi, rws, hi, cols])
            decay = lax.broadcast_in_dim(lc(f_c[rows["decay"][0]], ROW), (dk, dvb), [0])
            st = mm_acc(st * decay, kw_s, v_c, interpret)
            plgpu.wait_smem_to_gmem(0)  # o_s is rewritten by the next chunk
            return st

        st = lax.fori_loop(0, n, step, st)
        s32_s[...] = st
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s32_s, sf_ref.at[bi, hi, :, cols])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        smem_tile((2, c, dk), bf16),  # qm (double-buffered)
        smem_tile((2, dk, c), bf16),  # km^T
        smem_tile((2, c, dvb), bf16),  # v
        plgpu.SMEM((2, nf, dk), f32),  # gate-factor table
        smem_tile((c, dk), bf16),  # q-side wgmma operand (rewritten per matmul)
        smem_tile((dk, c), bf16),  # k-side wgmma operand
        smem_tile((c, c), bf16),  # P
        smem_tile((dk, dvb), bf16),  # state, bf16 copy
        smem_tile((dk, dvb), f32),  # state, f32 (initial / final)
        smem_tile((c, dvb), out_dtype),  # output tile
        plgpu.Barrier(num_barriers=pipeline_barriers(4)),
    ]
    kernel = plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((bsz, t_len, heads, dv), out_dtype),
            jax.ShapeDtypeStruct((bsz, heads, dk, dv), f32),
        ),
        scratch_types=scratch,
        grid=(bsz, heads, nv),
        grid_names=("b", "h", "v"),
        interpret=interpret,
        kernel_name="gla_scan_fwd_wgmma",
    )
    return kernel(qm, kmt, v, fac, s0)


def gla_smem_bytes(chunk, sub, dk, block_dv, out_dtype=jnp.bfloat16):
    """Shared memory the vector-gate kernel's scratch takes (bytes, without barriers)."""
    nf = gla_factor_rows(chunk // sub)[1]
    c, o = chunk, jnp.dtype(out_dtype).itemsize
    return (
        2 * (2 * c * dk * 2 + c * block_dv * 2 + nf * dk * 4)
        + 2 * c * dk * 2
        + c * c * 2
        + dk * block_dv * (2 + 4)
        + c * block_dv * o
    )
