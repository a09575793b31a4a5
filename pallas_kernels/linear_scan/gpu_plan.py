"""What the Mosaic GPU scan kernels accept: the sizes they take, the chunk at which the SSD kernels fit an sm_90
block's shared memory, and the exponent bound of the GLA kernels' sub-chunk factorisation."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.linear_scan import gpu_bwd, gpu_fwd
from pallas_kernels.linear_scan.gpu_common import SMEM_LIMIT

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


def ssd_smem_bytes(chunk, dk, block_dv):
    """The most shared memory any kernel of the SSD op takes (forward with a float32 output tile, the larger one, and
    the backward's state pass, dq/dk and dv kernels): what the chunk plan holds against ``SMEM_LIMIT``."""
    return max(
        gpu_fwd.ssd_fwd_smem_bytes(chunk, dk, block_dv, jnp.float32),
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
