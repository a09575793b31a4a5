"""The Pallas kernel entry points of the scans, called directly (one device, no ``shard_map``): ``gla`` (vector
gates) and ``ssd`` (Mamba2, scalar per-head gates) on the TPU scan kernel (``op``/``tpu``) or the Mosaic GPU wgmma
kernels (``gpu``). The ops with the ``impl=`` switch are in ``api``."""

from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_kernels.common import BlockSizes, resolve_backend, round_up
from pallas_kernels.linear_scan import gpu, gpu_common, gpu_plan
from pallas_kernels.linear_scan.checks import check_gla, check_nonempty, check_ssd
from pallas_kernels.linear_scan.op import _Static, scan_op
from pallas_kernels.linear_scan.tpu import ScanLayout


def supports(
    op: str,
    *,
    dk: int,
    dv: int,
    t_len: int,
    chunk_size: int,
    backend: str | None = None,
    interpret=False,
    block_sizes: BlockSizes | None = None,
) -> bool:
    """Whether the kernel family of ``backend`` (default: the current device's) takes this call of ``op`` ("gla" or
    "ssd"; ``dk`` = key width (SSD's N), ``dv`` = value width (SSD's P)). The TPU kernel takes any shape; the Mosaic
    GPU kernels need Dk a multiple of 64, Dv a multiple of ``block_sizes.block_dv`` and a chunk that is a multiple of
    64 (see ``gpu_plan.check_supported``); for "ssd" also a chunk (the requested one or a smaller multiple of 64, unless
    ``block_sizes.chunk`` fixes it) at which all its kernels fit the shared memory of an sm_90 block
    (``gpu_plan.ssd_chunk``; at N = 256 none does). ``api`` uses this to fall back to XLA under ``impl="auto"``."""
    if op not in ("gla", "ssd"):
        raise ValueError(f"linear_scan.supports: unknown op {op!r}")
    try:
        be = resolve_backend(backend, interpret)
    except NotImplementedError:
        return False
    if be != "gpu":
        return True
    bs = block_sizes if block_sizes is not None else BlockSizes.default("gpu")
    try:
        chunk = _gpu_chunk(t_len, chunk_size, bs)
        gpu_plan.check_supported(chunk, dk, dv, bs.block_dv)
        if op == "ssd":
            gpu_plan.ssd_chunk(chunk, dk, bs.block_dv, fixed=bs.chunk is not None)
    except (NotImplementedError, ValueError):
        return False
    return True


def _requested_chunk(chunk_size, bs: BlockSizes) -> int:
    """``BlockSizes.chunk`` if set, else the op's ``chunk_size``; a positive int."""
    chunk = bs.chunk if bs.chunk is not None else chunk_size
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk!r}")
    return chunk


def _gpu_chunk(t_len, chunk_size, bs: BlockSizes):
    """The chunk the Mosaic GPU kernels use: the requested one, at most one 64-row wgmma tile past the sequence."""
    return min(_requested_chunk(chunk_size, bs), round_up(t_len, 64))


def gla_gpu_gates_ok(log_gate, *, chunk_size: int = 64, block_sizes: BlockSizes | None = None):
    """Scalar bool (traceable): whether the Mosaic GPU GLA kernels' exponent bound holds for these log-gates
    ``[batch, time, heads, Dk]``.

    The kernels refer q and k to the middle row of their sub-chunk (``gpu_fwd.gla_scan_fwd``), so the factors
    ``exp(b_t - m_i)`` / ``exp(m_j - b_s)`` have positive exponents up to the log-gate total of half a sub-chunk per
    channel (``gpu_plan.gla_max_exponent``). Up to ``gpu_plan.GLA_SAFE_EXPONENT`` both the large factor and its small
    partner stay normal float32/bfloat16 numbers; beyond it the diagonal blocks would lose terms or overflow.
    ``api.gla`` runs its exact XLA path (every exponent non-positive) when this is False."""
    bs = block_sizes if block_sizes is not None else BlockSizes.default("gpu")
    t_len = log_gate.shape[1]
    chunk = _gpu_chunk(t_len, chunk_size, bs)
    g = jnp.pad(log_gate.astype(jnp.float32), [(0, 0), (0, round_up(t_len, chunk) - t_len), (0, 0), (0, 0)])
    return gpu_plan.gla_max_exponent(g, sub=math.gcd(chunk, bs.sub_chunk)) <= gpu_plan.GLA_SAFE_EXPONENT


def _plan(t_len, chunk_size, bs: BlockSizes, vector: bool):
    chunk = _requested_chunk(chunk_size, bs)
    # The secondary chunk must divide the chunk: gcd(chunk, BlockSizes.sub_chunk).
    sub = math.gcd(chunk, bs.sub_chunk)
    # Short sequences shrink the chunk, to a multiple of 16 rows (a bf16 sublane tile on TPU) and of the sub-chunk.
    chunk = min(chunk, round_up(t_len, math.lcm(sub, 16) if vector else 16))
    return chunk, sub


def _run(q, k, v, g, st0, *, scale, chunk_size, interpret, block_sizes, backend, vector, rep=1):
    """q, k: [B, T, H/rep, Dk] (rep heads share a q/k group); v: [B, T, H, Dv]; g: [B, T, H, Dk] (vector) or
    [B, T, H] (scalar); st0: [B, H, Dv, Dk] float32. Returns (o [B, T, H, Dv], S^T float32)."""
    gpu_interp = gpu_common.is_gpu_interpret(interpret)  # the Mosaic GPU interpreter runs the GPU kernel family
    be = "gpu" if gpu_interp and backend is None else resolve_backend(backend, interpret)
    if gpu_interp and be != "gpu":
        raise ValueError(f"linear_scan: Mosaic GPU interpret params need backend='gpu' (or None), got {backend!r}")
    if be == "gpu" and (not interpret or gpu_interp):
        if vector:
            return _run_gpu_gla(
                q,
                k,
                v,
                g,
                st0,
                scale=scale,
                chunk_size=chunk_size,
                block_sizes=block_sizes,
                interpret=interpret if gpu_interp else None,
            )
        return _run_gpu(
            q, k, v, g, st0, chunk_size=chunk_size, block_sizes=block_sizes, interpret=interpret if gpu_interp else None
        )
    bs = block_sizes if block_sizes is not None else BlockSizes.default(be)
    bsz, t_len, heads, dv = v.shape
    dk = q.shape[-1]
    chunk, sub = _plan(t_len, chunk_size, bs, vector)
    tp = round_up(t_len, chunk)
    time_major = be == "tpu" and (
        bs.scan_layout == "time_major" or (bs.scan_layout == "auto" and dk % 128 == 0 and dv % 128 == 0)
    )
    if not time_major and rep > 1:
        q, k = jnp.repeat(q, rep, axis=2), jnp.repeat(k, rep, axis=2)
    # Padded tokens have k = v = 0 and log-gate 0, so they leave the state unchanged.
    pad_t = lambda a: jnp.pad(a, [(0, 0), (0, tp - t_len)] + [(0, 0)] * (a.ndim - 2))
    q, k, v, g = pad_t(q), pad_t(k), pad_t(v), pad_t(g.astype(jnp.float32))
    if time_major:
        flat = lambda a: a.reshape(bsz, tp, -1)
        q, k, v = flat(q), flat(k), flat(v)
        g = flat(g) if vector else jnp.swapaxes(g, 1, 2)[..., None]
    else:
        q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
        g = jnp.swapaxes(g, 1, 2) if vector else jnp.swapaxes(g, 1, 2)[..., None]
    layout = ScanLayout("time" if time_major else "head", heads, dk, dv, rep if time_major else 1)
    st = _Static(
        scale=float(scale),
        chunk=chunk,
        sub_chunk=sub,
        backend=be,
        interpret=interpret,
        layout=layout,
        scalar=not vector,
    )
    o, sf = scan_op(q, k, v, g, st0, st)
    o = o.reshape(bsz, tp, heads, dv) if time_major else jnp.swapaxes(o, 1, 2)
    return o[:, :t_len], sf


def _run_gpu(q, k, v, g, st0, *, chunk_size, block_sizes, interpret):
    """Scalar gates on the Mosaic GPU wgmma kernels (``gpu.scalar_scan``; backward on the ``gpu_bwd`` kernels; T is
    padded with k = v = 0 and gate 0, whose cotangents are dropped by the final slice). Same arguments
    as ``_run``; q/k keep their groups (the kernel reads group ``h // rep``). ``interpret``: None (compile) or
    the Mosaic GPU interpreter's params."""
    bs = block_sizes if block_sizes is not None else BlockSizes.default("gpu")
    bsz, t_len, heads, dv = v.shape
    chunk = _gpu_chunk(t_len, chunk_size, bs)  # short sequences: one 64-row wgmma tile is the smallest chunk
    gpu_plan.check_supported(chunk, q.shape[-1], dv, bs.block_dv)
    # at most the requested chunk, shrunk to one whose kernels fit the shared memory (Mamba2's 256 does not)
    chunk = gpu_plan.ssd_chunk(chunk, q.shape[-1], bs.block_dv, fixed=bs.chunk is not None)
    tp = round_up(t_len, chunk)
    pad_t = lambda a: jnp.pad(a, [(0, 0), (0, tp - t_len)] + [(0, 0)] * (a.ndim - 2))
    o, s = gpu.scalar_scan(
        pad_t(q),
        pad_t(k),
        pad_t(v),
        pad_t(g.astype(jnp.float32)),
        jnp.swapaxes(st0, 2, 3),
        chunk,
        bs.block_dv,
        interpret,
    )
    return o[:, :t_len].astype(v.dtype), jnp.swapaxes(s, 2, 3)


def _run_gpu_gla(q, k, v, g, st0, *, scale, chunk_size, block_sizes, interpret):
    """Vector gates on the Mosaic GPU wgmma kernels (``gpu.vector_scan``; backward on the ``gpu_bwd`` kernels). Same
    arguments as ``_run`` (q, k, g ``[B, T, H, Dk]``; st0 ``[B, H, Dv, Dk]``). The sub-chunk is
    ``gcd(chunk, BlockSizes.sub_chunk)``."""
    bs = block_sizes if block_sizes is not None else BlockSizes.default("gpu")
    t_len, dv = v.shape[1], v.shape[3]
    chunk = _gpu_chunk(t_len, chunk_size, bs)  # short sequences: one 64-row wgmma tile is the smallest chunk
    gpu_plan.check_supported(chunk, q.shape[-1], dv, bs.block_dv)
    sub = math.gcd(chunk, bs.sub_chunk)
    tp = round_up(t_len, chunk)
    # Padded tokens have k = v = 0 and log-gate 0, so they leave the state unchanged.
    pad_t = lambda a: jnp.pad(a, [(0, 0), (0, tp - t_len)] + [(0, 0)] * (a.ndim - 2))
    o, s = gpu.vector_scan(
        pad_t(q),
        pad_t(k),
        pad_t(v),
        pad_t(g.astype(jnp.float32)),
        jnp.swapaxes(st0, 2, 3),
        float(scale),
        chunk,
        sub,
        bs.block_dv,
        interpret,
    )
    return o[:, :t_len].astype(v.dtype), jnp.swapaxes(s, 2, 3)


def gla(
    q,
    k,
    v,
    log_gate,
    *,
    scale: float | None = None,
    initial_state=None,
    chunk_size: int = 64,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
):
    """Gated linear attention with per-key-channel gates.

    ``S_t = diag(exp(log_gate_t)) S_{t-1} + k_t v_t^T``, ``o_t = (scale q_t)^T S_t`` per (batch, head).

    Args:
      q, k: ``[batch, time, heads, Dk]``; v: ``[batch, time, heads, Dv]``.
      log_gate: ``[batch, time, heads, Dk]``, ``<= 0`` (log of the forget gate); accumulated in float32.
      scale: query scale, default ``Dk ** -0.5``.
      initial_state: optional ``[batch, heads, Dk, Dv]``.
      chunk_size: tokens per chunk (best a multiple of ``BlockSizes.sub_chunk``); shortened for short sequences.
      interpret, block_sizes, backend: as in ``pallas_kernels.short_conv.short_conv`` (``interpret`` may be a
        ``pltpu.InterpretParams``, or the Mosaic GPU interpreter's params ``gpu_common.interpret_params()``).
        ``backend="gpu"`` runs the Mosaic GPU wgmma kernel (``gpu.vector_scan``: Dk a multiple of 64, Dv of
        ``block_sizes.block_dv``, chunk a multiple of 64; backward on the Mosaic GPU kernels of ``gpu_bwd``).

    Returns:
      ``(o [batch, time, heads, Dv] in v.dtype, final_state [batch, heads, Dk, Dv] float32)``.
    """
    check_gla("gla", q, k, v, log_gate, initial_state)
    check_nonempty("gla", q=q, v=v)
    bsz, _, heads, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    st0 = (
        jnp.zeros((bsz, heads, dv, dk), jnp.float32)
        if initial_state is None
        else jnp.swapaxes(initial_state.astype(jnp.float32), 2, 3)
    )
    o, sf = _run(
        q,
        k,
        v,
        log_gate,
        st0,
        scale=scale,
        chunk_size=chunk_size,
        interpret=interpret,
        block_sizes=block_sizes,
        backend=backend,
        vector=True,
    )
    return o, jnp.swapaxes(sf, 2, 3)


def ssd(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    *,
    initial_state=None,
    chunk_size: int = 64,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
):
    """Mamba2 state-space duality scan on the scalar-gate kernel.

    ``h_t = exp(dt_t A_h) h_{t-1} + (dt_t x_t) B_t^T``, ``y_t = h_t C_t + D_h x_t`` per (batch, head).

    Args:
      x: ``[batch, time, heads, P]``; dt: ``[batch, time, heads]`` (already softplus-ed, > 0); A: ``[heads]`` (< 0).
      B, C: ``[batch, time, groups, N]`` with ``heads % groups == 0`` (head h uses group ``h // (heads/groups)``).
      D: optional ``[heads]`` skip. initial_state: optional ``[batch, heads, P, N]``.
      chunk_size: tokens per chunk; the Mosaic GPU kernels take the largest multiple of 64 up to it at which they
        fit an sm_90 block's shared memory (``gpu_plan.ssd_chunk``: 64 for Mamba2's 256 at N = 128), unless
        ``block_sizes.chunk`` fixes the chunk.

    Returns:
      ``(y [batch, time, heads, P] in x.dtype, final_state [batch, heads, P, N] float32)``.
    """
    check_ssd("ssd", x, dt, A, B, C, D, initial_state)
    check_nonempty("ssd", x=x, B=B)
    bsz, t_len, heads, p = x.shape
    n = B.shape[-1]
    rep = heads // B.shape[2]
    dtf = dt.astype(jnp.float32)
    v = (dtf[..., None] * x.astype(jnp.float32)).astype(x.dtype)
    g = dtf * A.astype(jnp.float32)  # scalar log-gate per (token, head)
    st0 = (
        jnp.zeros((bsz, heads, p, n), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    )  # the kernel's S^T [Dv, Dk] is exactly h [P, N]
    y, sf = _run(
        C,
        B,
        v,
        g,
        st0,
        scale=1.0,
        chunk_size=chunk_size,
        interpret=interpret,
        block_sizes=block_sizes,
        backend=backend,
        vector=False,
        rep=rep,
    )
    if D is not None:
        y = (y.astype(jnp.float32) + D.astype(jnp.float32)[:, None] * x.astype(jnp.float32)).astype(x.dtype)
    return y, sf
