"""Mosaic GPU (Hopper, wgmma) forward kernels of the chunked scan: ``ssd_scan_fwd`` for *scalar* per-head gates
(Mamba2 SSD) and ``gla_scan_fwd`` for *vector* gates (GLA, one log-gate per key channel; described at the end), and
their custom VJPs ``scalar_scan`` / ``vector_scan``, whose backward runs the Mosaic GPU backward kernels of
``gpu_bwd`` (two state passes, then per-chunk dq/dk and dv kernels; XLA for the gate gradient).

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

Everything goes through shared memory by TMA (``copy_gmem_to_smem``); the chunk operands are double-buffered (the
copies of chunk ``c + 1`` are issued before chunk ``c`` is computed). Otherwise untuned: one warpgroup per CTA,
synchronous wgmma, the output tile's store is waited for at every chunk.

Status (jax 0.10.2, no GPU in the session that wrote it): lowers with ``jax.export(..., platforms=["cuda"])`` at the
paper's shape; values checked in Mosaic GPU interpret mode (``InterpretGPUParams``) against float64 references at
small shapes; **never compiled by ptxas nor run on a GPU**. See docs/kernels.md.

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
``_vector_scan_xla`` (an XLA chunked form of the same factorisation, formerly the backward via ``jax.vjp``) and
``_scalar_scan_xla`` stay as references.

``tpu_body_scan_call`` keeps the earlier attempt (the TPU kernel body under Mosaic GPU compiler params), which does
not lower (shared-memory overflow), so that the failure stays reproducible in ``tests/kernels/test_export.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.linear_scan import reference, tpu

SMEM_LIMIT = 232_448  # bytes of shared memory one block may opt in to on sm_90 (H100 / H200)
_ALIGN = 1024  # Mosaic GPU rounds every shared-memory scratch buffer up to 1 KiB
_BARRIER = 8  # bytes per mbarrier

WG = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # a vector indexed by the row of a WGMMA-layout [M, N] array
COL = plgpu.Layout.WGMMA.reduce(0)  # a vector indexed by the column


def interpret_params():
    """The Mosaic GPU interpreter (jax 0.10.2 keeps it under ``jax._src``; not re-exported by ``plgpu``)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def is_gpu_interpret(interpret) -> bool:
    """Whether ``interpret`` asks for the Mosaic GPU interpreter (runs this file's wgmma kernel on CPU)."""
    if interpret is None or isinstance(interpret, bool):
        return False
    try:  # a private module in jax 0.10.2: absent elsewhere means "not the GPU interpreter"
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:  # pragma: no cover - depends on the jax version
        return False
    return isinstance(interpret, InterpretGPUParams)


def _bytes(*buffers):
    """Shared memory of scratch buffers ``(shape, dtype)`` / barrier counts (int) as Mosaic GPU allocates them."""
    total = 0
    for b in buffers:
        if isinstance(b, int):
            total += _BARRIER * b
        else:
            shape, dtype = b
            size = jnp.dtype(dtype).itemsize
            for s in shape:
                size *= s
            total += -(-size // _ALIGN) * _ALIGN
    return total


def _smem(shape, dtype):
    """A 2-D shared-memory tile laid out for TMA and wgmma: 128-byte swizzle, tiles of (8, 128 bytes)."""
    minor = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, minor)), plgpu.SwizzleTransform(128)))


def _mm(a_ref, b_ref, shape):
    """``a @ b`` of two shared-memory refs by wgmma into a fresh float32 accumulator; returns the value."""

    def body(acc):
        plgpu.wgmma(acc, a_ref, b_ref)
        return acc[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _mm_acc(acc0, a_ref, b_ref, interpret=None):
    """``acc0 + a @ b``: wgmma into an accumulator initialised with the register value ``acc0`` (no second tile).
    The Mosaic GPU interpreter of jax 0.10.2 has no rule for ``run_state``: there it adds a fresh product (same
    value; the interpreter does not model registers)."""
    if interpret is not None:
        return acc0 + _mm(a_ref, b_ref, acc0.shape)

    def body(acc):
        plgpu.wgmma(acc, a_ref, b_ref)

    return pl.run_state(body)(plgpu.ACC.init(acc0))


def _scale_sub(x, idx, dim, vecs, ell):
    """``x`` with the elements of sub-chunk i (of ``ell`` tokens) times ``vecs[i]()``, zero where ``vecs[i]`` is
    None. ``idx``: the 1-D token index of ``x``'s axis ``dim``; the masks are formed on it and broadcast (no
    [C, Dk] index tile in registers), and one factor is applied at a time (one factor vector live, not all)."""
    sub_id = lax.div(idx, ell)
    bc = lambda m: lax.broadcast_in_dim(m, x.shape, [dim])
    if any(f is None for f in vecs):
        keep = functools.reduce(jnp.logical_or, [sub_id == i for i, f in enumerate(vecs) if f is not None])
        x = jnp.where(bc(keep), x, 0.0)
    for i, f in enumerate(vecs):
        if f is not None:
            x = jnp.where(bc(sub_id == i), x * f(), x)
    return x


def _mm2(a_ref, b_ref, c_ref, d_ref, shape):
    """``a @ b + c @ d``: two wgmma into one fresh float32 accumulator."""

    def body(acc):
        plgpu.wgmma(acc, a_ref, b_ref)
        plgpu.wgmma(acc, c_ref, d_ref)
        return acc[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


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
        bufs = (q_s, kt_s, v_s, b_s, eb_s, ek_s, sd_s)  # double-buffered: [2, ...]
        bi, hi, vi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
        gi = lax.div(hi, jnp.int32(rep))
        cols = pl.ds(vi * dvb, dvb)

        n_in = 7  # operands copied per chunk

        def issue(ci, slot):
            """Starts the TMA copies of chunk ``ci`` into buffer ``slot`` (one barrier per operand and slot)."""
            rows = pl.ds(ci * c, c)
            copies = (
                (q_ref.at[bi, rows, gi, :], q_s),
                (kt_ref.at[bi, gi, :, rows], kt_s),
                (v_ref.at[bi, rows, hi, cols], v_s),
                (b_ref.at[bi, hi, rows], b_s),
                (eb_ref.at[bi, hi, rows], eb_s),
                (ek_ref.at[bi, hi, rows], ek_s),
                (sd_ref.at[bi, hi, ci, :], sd_s),
            )
            for i, (src, dst) in enumerate(copies):
                plgpu.copy_gmem_to_smem(src, dst.at[slot], bars.at[slot * n_in + i])

        plgpu.copy_gmem_to_smem(s0_ref.at[bi, hi, :, cols], s32_s, bars.at[2 * n_in])
        issue(0, 0)
        plgpu.barrier_wait(bars.at[2 * n_in])
        st = lc(s32_s[...], WG)

        def step(ci, st):
            rows = pl.ds(ci * c, c)
            slot = lax.rem(ci, 2)

            @pl.when(ci + 1 < n)
            def _prefetch():  # the other buffer was last read by chunk ci - 1, whose matmuls are all finished
                issue(ci + 1, 1 - slot)

            for i in range(n_in):
                plgpu.barrier_wait(bars.at[slot * n_in + i])
            q_s, kt_s, v_s, b_s, eb_s, ek_s, sd_s = (r.at[slot] for r in bufs)
            # the state entering the chunk, rounded for the Q S wgmma
            s16_s[...] = st.astype(bf16)
            # intra-chunk scores with the causal decay mask
            scores = _mm(q_s, kt_s, (c, c))
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
            inter = _mm(q_s, s16_s, (c, dvb))
            intra = _mm(p_s, v_s, (c, dvb))
            ebv = lc(eb_s[...], ROW)
            out = inter * lax.broadcast_in_dim(ebv, (c, dvb), [0]) + intra
            o_s[...] = out.astype(o_s.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[bi, rows, hi, cols])
            upd = _mm(kt_s, vd_s, (dk, dvb))
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
        _smem((2, c, dk), bf16),  # q (two buffers: chunk ci + 1 is copied in while chunk ci is computed)
        _smem((2, dk, c), bf16),  # k^T
        _smem((2, c, dvb), bf16),  # v
        _smem((c, dvb), bf16),  # decayed v
        _smem((c, c), bf16),  # P
        _smem((dk, dvb), bf16),  # state, bf16 copy
        _smem((dk, dvb), f32),  # state, f32 (initial / final)
        _smem((c, dvb), out_dtype),  # output tile
        plgpu.SMEM((2, c), f32),
        plgpu.SMEM((2, c), f32),
        plgpu.SMEM((2, c), f32),
        plgpu.SMEM((2, dk), f32),
        plgpu.Barrier(num_barriers=2 * 7 + 1),
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


def _gla_factor_rows(n_sub):
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


def _prep_vector_gates(q, k, g, *, scale, chunk, sub):
    """XLA-side operands of ``gla_scan_fwd`` (float32 math, one pass over q, k, g).

    q, k, g: ``[B, T, H, Dk]`` (T a multiple of chunk; g raw log-gates). Returns ``qm [B, T, H, Dk]`` bfloat16
    (``scale q_t exp(b_t - m_i)``), ``km^T [B, H, Dk, T]`` bfloat16 (``k_s exp(m_j - b_s)``), both referred to the
    middle row of the token's own sub-chunk, and ``F [B, H, T / chunk, NF, Dk]`` float32 (``_gla_factor_rows``)."""
    bsz, t_len, heads, dk = q.shape
    n, n_sub, ell = t_len // chunk, chunk // sub, sub
    f32 = jnp.float32
    b = jnp.cumsum(g.astype(f32).reshape(bsz, n, chunk, heads, dk), axis=2).reshape(bsz, n, n_sub, ell, heads, dk)
    e = b[:, :, :, ell - 1]  # [B, n, n_sub, H, Dk]: last row of each sub-chunk
    m = b[:, :, :, (ell - 1) // 2]  # middle row: splits each diagonal block's exponent range in two halves
    b_last = e[:, :, -1]  # [B, n, H, Dk]
    qm = (q.astype(f32) * scale).reshape(b.shape) * jnp.exp(b - m[:, :, :, None])
    km = k.astype(f32).reshape(b.shape) * jnp.exp(m[:, :, :, None] - b)
    rows, nf = _gla_factor_rows(n_sub)
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
    """Vector-gate (GLA) chunked scan, forward, on the operands of ``_prep_vector_gates``.

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
    rows, nf = _gla_factor_rows(n_sub)
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
        bufs = (q_s, kt_s, v_s, f_s)
        n_in = len(bufs)

        def issue(ci, slot):
            rws = pl.ds(ci * c, c)
            copies = (
                (qm_ref.at[bi, rws, hi, :], q_s),
                (kmt_ref.at[bi, hi, :, rws], kt_s),
                (v_ref.at[bi, rws, hi, cols], v_s),
                (f_ref.at[bi, hi, ci], f_s),
            )
            for i, (src, dst) in enumerate(copies):
                plgpu.copy_gmem_to_smem(src, dst.at[slot], bars.at[slot * n_in + i])

        plgpu.copy_gmem_to_smem(s0_ref.at[bi, hi, :, cols], s32_s, bars.at[2 * n_in])
        issue(0, 0)
        plgpu.barrier_wait(bars.at[2 * n_in])
        st = lc(s32_s[...], WG)

        def step(ci, st):
            rws = pl.ds(ci * c, c)
            slot = lax.rem(ci, 2)

            @pl.when(ci + 1 < n)
            def _prefetch():  # the other buffer was last read by chunk ci - 1, whose matmuls are all finished
                issue(ci + 1, 1 - slot)

            for i in range(n_in):
                plgpu.barrier_wait(bars.at[slot * n_in + i])
            q_c, kt_c, v_c, f_c = (r.at[slot] for r in bufs)
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
            diag = _mm(q_c, kt_c, (c, c))
            keep = (r_id >= c_id) & (lax.div(r_id, ell) == lax.div(c_id, ell))
            a = jnp.where(keep, diag, 0.0)
            # sub-chunk pairs j < i: (qm exp(m_i - e_j)) (km exp(e_j - m_j))^T. The q side is zero in the rows of
            # sub-chunks <= j and the k side zero outside the columns of sub-chunk j, so the product lands only in
            # the (i > j, columns j) blocks and is accumulated straight into ``a``.
            for j in range(n_sub - 1):
                fk = [kside(rows["koff"][j]) if i == j else None for i in range(n_sub)]
                kw_s[...] = _scale_sub(kt_c[...].astype(f32), k_cols, 1, fk, ell).astype(bf16)
                fq = [qside(rows["qoff"][i, j]) if i > j else None for i in range(n_sub)]
                qw_s[...] = _scale_sub(q_c[...].astype(f32), q_rows, 0, fq, ell).astype(bf16)
                plgpu.commit_smem()
                a = _mm_acc(a, qw_s, kw_s, interpret)
            p_s[...] = a.astype(bf16)
            # O = (q exp(b_t)) S + P V, both into one accumulator
            fq = [qside(r) for r in rows["inter"]]
            qw_s[...] = _scale_sub(q_c[...].astype(f32), q_rows, 0, fq, ell).astype(bf16)
            plgpu.commit_smem()
            o_s[...] = _mm2(qw_s, s16_s, p_s, v_c, (c, dvb)).astype(o_s.dtype)
            # state update operand: (k exp(b_C - b_s))^T; S <- exp(b_C) S + that^T V, accumulated into the state
            fk = [kside(r) for r in rows["kstate"]]
            kw_s[...] = _scale_sub(kt_c[...].astype(f32), k_cols, 1, fk, ell).astype(bf16)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[bi, rws, hi, cols])
            decay = lax.broadcast_in_dim(lc(f_c[rows["decay"][0]], ROW), (dk, dvb), [0])
            st = _mm_acc(st * decay, kw_s, v_c, interpret)
            plgpu.wait_smem_to_gmem(0)  # o_s is rewritten by the next chunk
            return st

        st = lax.fori_loop(0, n, step, st)
        s32_s[...] = st
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s32_s, sf_ref.at[bi, hi, :, cols])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        _smem((2, c, dk), bf16),  # qm (double-buffered)
        _smem((2, dk, c), bf16),  # km^T
        _smem((2, c, dvb), bf16),  # v
        plgpu.SMEM((2, nf, dk), f32),  # gate-factor table
        _smem((c, dk), bf16),  # q-side wgmma operand (rewritten per matmul)
        _smem((dk, c), bf16),  # k-side wgmma operand
        _smem((c, c), bf16),  # P
        _smem((dk, dvb), bf16),  # state, bf16 copy
        _smem((dk, dvb), f32),  # state, f32 (initial / final)
        _smem((c, dvb), out_dtype),  # output tile
        plgpu.Barrier(num_barriers=2 * 4 + 1),
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


GLA_SAFE_EXPONENT = 60.0  # exp(60) ~ 1e26 and exp(-60) ~ 1e-26: both normal float32 / bfloat16 numbers


def gla_max_exponent(g, *, sub: int):
    """Largest positive exponent in the vector-gate kernels' ``qm = q exp(b_t - m_i)`` / ``km = k exp(m_j - b_s)``
    factors for raw log-gates ``g [B, T, H, Dk]`` (T a multiple of the sub-chunk ``sub``; sub-chunks are aligned
    to it): per sub-chunk and channel, the larger
    of the log-gate totals between its first row and its middle row and between its middle row and its last row
    (negated). A float32 scalar."""
    bsz, t_len, heads, dk = g.shape
    gs = g.astype(jnp.float32).reshape(bsz, t_len // sub, sub, heads, dk)
    mid = (sub - 1) // 2
    head = -jnp.sum(gs[:, :, 1 : mid + 1], axis=2)  # b_first - b_mid
    tail = -jnp.sum(gs[:, :, mid + 1 :], axis=2)  # b_mid - b_last
    return jnp.max(jnp.maximum(head, tail))


def gla_smem_bytes(chunk, sub, dk, block_dv, out_dtype=jnp.bfloat16):
    """Shared memory the vector-gate kernel's scratch takes (bytes, without barriers)."""
    nf = _gla_factor_rows(chunk // sub)[1]
    c, o = chunk, jnp.dtype(out_dtype).itemsize
    return (
        2 * (2 * c * dk * 2 + c * block_dv * 2 + nf * dk * 4)
        + 2 * c * dk * 2
        + c * c * 2
        + dk * block_dv * (2 + 4)
        + c * block_dv * o
    )


def _vector_scan_xla(q, k, v, g, s0, scale, chunk, sub):
    """The vector-gate scan in plain XLA with the kernel's factorisation (float32), a reference (it was the
    backward of ``vector_scan`` through ``jax.vjp`` before ``gpu_bwd``). Arguments as ``vector_scan``; returns
    ``(o [B, T, H, Dv], S [B, H, Dk, Dv])`` float32.

    Intra-chunk scores are whole ``[C, C]`` matrices per chunk (batched over all chunks, no per-column loop):
    diagonal sub-chunk blocks ``qm km^T`` (both referred to the block's middle row), earlier sub-chunks through
    ``(qm exp(m_i - e_j)) (k exp(e_j - b_s))^T``; the states entering the chunks come from a ``lax.scan`` over
    the chunks. Dropped entries are removed with ``where`` (selection), so a large product there leaves no trace in
    the values and none in the gradients (their cotangent is zero)."""
    f32 = jnp.float32
    bsz, t_len, heads, dk = q.shape
    dv = v.shape[-1]
    n, n_sub, ell = t_len // chunk, chunk // sub, sub
    chunks = lambda a: jnp.moveaxis(a.astype(f32).reshape((bsz, n, chunk, heads, a.shape[-1])), 3, 1)
    qc, kc, vc, gc = chunks(q) * scale, chunks(k), chunks(v), chunks(g)  # [B, H, n, C, X]
    b = jnp.cumsum(gc, axis=3)
    split = lambda a: a.reshape(a.shape[:3] + (n_sub, ell, a.shape[-1]))  # [B, H, n, n_sub, L, X]
    bs, qs, ks = split(b), split(qc), split(kc)
    m = bs[..., (ell - 1) // 2, :]  # [B, H, n, n_sub, Dk]
    e = bs[..., ell - 1, :]
    qm = qs * jnp.exp(bs - m[..., None, :])
    km = ks * jnp.exp(m[..., None, :] - bs)
    tri = jnp.arange(ell)[:, None] >= jnp.arange(ell)[None, :]
    a_diag = jnp.where(tri, jnp.einsum("...td,...sd->...ts", qm, km), 0.0)  # [B, H, n, n_sub, L, L]
    eye = jnp.eye(n_sub, dtype=f32)
    a_diag = jnp.einsum("...its,ij->...itjs", a_diag, eye)
    earlier = jnp.arange(n_sub)[:, None] > jnp.arange(n_sub)[None, :]  # [i, j]: j < i
    qf = jnp.exp(jnp.where(earlier[:, :, None], m[..., :, None, :] - e[..., None, :, :], 0.0))  # [.., i, j, Dk]
    kend = ks * jnp.exp(e[..., None, :] - bs)  # k exp(e_j - b_s) <= 1
    a_off = jnp.einsum("...itd,...ijd,...jsd->...itjs", qm, qf, kend)
    a_off = jnp.where(earlier[:, None, :, None], a_off, 0.0)
    attn = (a_diag + a_off).reshape(b.shape[:3] + (chunk, chunk))
    o = jnp.einsum("...ts,...se->...te", attn, vc)
    b_last = b[..., -1, :]  # [B, H, n, Dk]
    upd = jnp.einsum("...sd,...se->...de", kc * jnp.exp(b_last[..., None, :] - b), vc)  # [B, H, n, Dk, Dv]

    def step(st, xs):
        dec, u = xs
        return jnp.exp(dec)[..., None] * st + u, st

    final, starts = lax.scan(step, s0.astype(f32), (jnp.moveaxis(b_last, 2, 0), jnp.moveaxis(upd, 2, 0)))
    o = o + jnp.einsum("...td,...de->...te", qc * jnp.exp(b), jnp.moveaxis(starts, 0, 2))
    o = jnp.moveaxis(o, 1, 3).reshape(bsz, t_len, heads, dv)
    return o, final


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def vector_scan(q, k, v, g, s0, scale, chunk, sub, block_dv, interpret):
    """Vector-gate scan ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = (scale q_t)^T S_t`` on the wgmma kernel.

    q, k, g: ``[B, T, H, Dk]`` (g raw float32 log-gates); v: ``[B, T, H, Dv]``; s0: ``[B, H, Dk, Dv]`` float32.
    T a multiple of ``chunk``, ``sub`` divides ``chunk``. Returns ``(o [B, T, H, Dv] float32 if v is float32 else
    bfloat16, S [B, H, Dk, Dv] float32)``; the matmuls are bfloat16 either way. The backward runs the Mosaic GPU
    kernels of ``gpu_bwd`` (``gpu_bwd.vector_scan_bwd``; the same ``interpret``), recomputing the chunk states from
    the saved inputs.
    """
    qm, kmt, fac = _prep_vector_gates(q, k, g, scale=scale, chunk=chunk, sub=sub)
    return gla_scan_fwd(
        qm,
        kmt,
        v.astype(jnp.bfloat16),
        fac,
        s0,
        chunk=chunk,
        sub=sub,
        block_dv=block_dv,
        out_dtype=jnp.float32 if v.dtype == jnp.float32 else jnp.bfloat16,
        interpret=interpret,
    )


def _vector_scan_fwd(q, k, v, g, s0, scale, chunk, sub, block_dv, interpret):
    return vector_scan(q, k, v, g, s0, scale, chunk, sub, block_dv, interpret), (q, k, v, g, s0)


def _vector_scan_bwd(scale, chunk, sub, block_dv, interpret, res, cts):
    from pallas_kernels.linear_scan import gpu_bwd  # imports this module

    grads = gpu_bwd.vector_scan_bwd(
        *res, *cts, scale=scale, chunk=chunk, sub=sub, block_dv=block_dv, interpret=interpret
    )
    return tuple(d.astype(a.dtype) for d, a in zip(grads, res))


vector_scan.defvjp(_vector_scan_fwd, _vector_scan_bwd)


def tpu_body_scan_call(q, k, v, b, brow, st0, *, layout, scale, chunk, sub_chunk, out_dtype, interpret):
    """The TPU kernel body under Mosaic GPU compiler params (same contract as ``tpu.scan_call``). Does not lower in
    jax 0.10.2 (shared-memory overflow at the paper's shape); kept only to reproduce that failure."""
    params = plgpu.CompilerParams(dimension_semantics=("parallel", "parallel", "sequential"))
    return tpu.scan_call(
        q,
        k,
        v,
        b,
        brow,
        st0,
        layout=layout,
        scale=scale,
        chunk=chunk,
        sub_chunk=sub_chunk,
        out_dtype=out_dtype,
        interpret=interpret,
        params=params,
    )


scan_call = tpu_body_scan_call  # the name op.py used for the GPU family (interpret-mode runs of the TPU body)


def _prep_gates(g, chunk):
    """g: ``[B, T, H]`` raw scalar log-gates (T a multiple of chunk) -> the kernel's float32 gate operands."""
    bsz, t_len, heads = g.shape
    b = jnp.cumsum(jnp.swapaxes(g.astype(jnp.float32), 1, 2).reshape(bsz, heads, t_len // chunk, chunk), axis=-1)
    b_last = b[..., -1:]
    flat = lambda a: a.reshape(bsz, heads, t_len)
    return flat(b), flat(jnp.exp(b)), flat(jnp.exp(b_last - b)), jnp.exp(b_last)  # last: [B, H, n, 1]


def _scalar_scan_xla(q, k, v, g, s0, chunk):
    """The same scan on the XLA chunked path (``reference.scan_xla``), float32: a reference for the GPU op (it was
    the op's backward through ``jax.vjp`` before ``gpu_bwd``)."""
    rep = v.shape[2] // q.shape[2]
    hm = lambda a: jnp.swapaxes(jnp.repeat(a, rep, axis=2) if a.shape[2] != v.shape[2] else a, 1, 2)
    b = reference.chunk_cumsum(jnp.swapaxes(g, 1, 2)[..., None], chunk)
    o, st = reference.scan_xla(
        hm(q.astype(jnp.float32)),
        hm(k.astype(jnp.float32)),
        hm(v.astype(jnp.float32)),
        b,
        jnp.swapaxes(s0, 2, 3),
        scale=1.0,
        chunk=chunk,
        sub_chunk=chunk,
    )
    return jnp.swapaxes(o, 1, 2), jnp.swapaxes(st, 2, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def scalar_scan(q, k, v, g, s0, chunk, block_dv, interpret):
    """Scalar-gate scan ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = q_t^T S_t`` on the wgmma kernel.

    q, k: ``[B, T, G, Dk]`` (head h uses group ``h // (H/G)``); v: ``[B, T, H, Dv]``; g: ``[B, T, H]`` float32 raw
    log-gates; s0: ``[B, H, Dk, Dv]`` float32. T a multiple of ``chunk``. Returns ``(o [B, T, H, Dv] in v.dtype
    (bfloat16 or float32; the matmuls are bfloat16 either way), S [B, H, Dk, Dv] float32)``. The backward runs the
    Mosaic GPU kernels of ``gpu_bwd`` (``gpu_bwd.scalar_scan_bwd``; the same ``interpret``).
    """
    b, eb, ek, last = _prep_gates(g, chunk)
    bsz, heads, n = last.shape[:3]
    sdec = jnp.broadcast_to(last, (bsz, heads, n, q.shape[-1]))
    kt = jnp.swapaxes(jnp.swapaxes(k.astype(jnp.bfloat16), 1, 2), 2, 3)  # [B, G, Dk, T]
    return ssd_scan_fwd(
        q.astype(jnp.bfloat16),
        kt,
        v.astype(jnp.bfloat16),
        b,
        eb,
        ek,
        sdec,
        s0,
        chunk=chunk,
        block_dv=block_dv,
        rep=v.shape[2] // q.shape[2],
        out_dtype=jnp.float32 if v.dtype == jnp.float32 else jnp.bfloat16,
        interpret=interpret,
    )


def _scalar_scan_fwd(q, k, v, g, s0, chunk, block_dv, interpret):
    return scalar_scan(q, k, v, g, s0, chunk, block_dv, interpret), (q, k, v, g, s0)


def _scalar_scan_bwd(chunk, block_dv, interpret, res, cts):
    from pallas_kernels.linear_scan import gpu_bwd  # imports this module

    grads = gpu_bwd.scalar_scan_bwd(*res, *cts, chunk=chunk, block_dv=block_dv, interpret=interpret)
    return tuple(d.astype(a.dtype) for d, a in zip(grads, res))


scalar_scan.defvjp(_scalar_scan_fwd, _scalar_scan_bwd)


def ssd_fwd_smem_bytes(chunk, dk, block_dv, out_dtype=jnp.bfloat16):
    """Shared memory of ``ssd_scan_fwd`` (bytes, barriers included, as Mosaic GPU allocates it)."""
    c, dvb, bf16, f32 = chunk, block_dv, jnp.bfloat16, jnp.float32
    return _bytes(
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


def ssd_smem_bytes(chunk, dk, block_dv):
    """The most shared memory any kernel of the SSD op takes (forward with a float32 output tile, the larger one, and
    the backward's state pass, dq/dk and dv kernels): what the chunk plan holds against ``SMEM_LIMIT``."""
    from pallas_kernels.linear_scan import gpu_bwd  # imports this module

    return max(
        ssd_fwd_smem_bytes(chunk, dk, block_dv, jnp.float32),
        gpu_bwd.state_pass_smem_bytes(chunk, dk, block_dv),
        gpu_bwd.ssd_grads_dqk_smem_bytes(chunk, dk, block_dv),
        gpu_bwd.ssd_grads_dv_smem_bytes(chunk, dk, block_dv),
    )


def ssd_chunk(chunk, dk, block_dv, *, limit=SMEM_LIMIT, fixed=False):
    """The chunk the SSD kernels run at: the largest multiple of 64 up to ``chunk`` whose kernels all fit ``limit``
    bytes of shared memory (``ssd_smem_bytes``). Every tile the kernels hold grows with the chunk (``P`` as its
    square) while ``block_dv`` is already at its floor of one 64-column wgmma tile, so the chunk is the size to give:
    Mamba2's 256 needs 580,728 bytes in the forward at Dk = 128 (691,288 in the dq/dk kernel); 64 fits (168,056 at
    most). The chunk is a blocking of the same recurrence: the result is the same up to the bfloat16 rounding of the
    per-chunk operands.
    ``fixed``: the chunk was set explicitly (``BlockSizes.chunk``) and is not shrunk.
    Raises ``NotImplementedError`` naming the need and the limit when no chunk fits."""
    for c in [chunk] if fixed else range(chunk - chunk % 64, 63, -64):
        if ssd_smem_bytes(c, dk, block_dv) <= limit:
            return c
    c = chunk if fixed else 64
    raise NotImplementedError(
        f"Mosaic GPU SSD scan: its kernels need {ssd_smem_bytes(c, dk, block_dv)} bytes of "
        f"shared memory at chunk={c}, Dk (SSD's N)={dk}, block_dv={block_dv}; an sm_90 block "
        f"may use {limit}"
    )


def check_supported(chunk, dk, dv, block_dv):
    """Raises ``NotImplementedError`` naming the constraint when the wgmma kernel cannot take these sizes."""
    if chunk % 64 or chunk < 64:
        raise NotImplementedError(
            f"Mosaic GPU scan: chunk_size must be a positive multiple of 64 (the wgmma M tile), got {chunk}"
        )
    if dk % 64:
        raise NotImplementedError(f"Mosaic GPU scan: Dk (SSD's N) must be a multiple of 64, got {dk}")
    if block_dv % 64 or dv % block_dv:
        raise NotImplementedError(
            f"Mosaic GPU scan: Dv (SSD's P) must be a multiple of block_dv={block_dv} "
            f"(itself a multiple of 64), got {dv}"
        )
