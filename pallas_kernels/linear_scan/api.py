"""The linear recurrences as ops, each with one ``impl=`` switch and one set of argument checks: ``gla`` (gated
linear attention, per-key-channel gates), ``gated_delta_rule`` (Gated DeltaNet), ``ssd`` (Mamba2) and their decode
steps.

``impl`` (``pallas_kernels.common.IMPLEMENTATIONS[op]``):

* ``"auto"``: the Pallas kernel when the program is compiled for TPU or GPU devices (the trace-time mesh's, else the
  default backend's: ``pallas_kernels.common.target_platform``) and the target's kernel takes the call
  (``kernel.supports``: any shape on TPU; on GPU the Mosaic GPU wgmma kernels need Dk a multiple of 64, Dv of
  ``block_dv`` and a chunk of 64), else the chunked XLA form;
* ``"xla"`` and ``"cpu"``: the chunked XLA form (``gla_xla`` / ``gdn_xla`` / ``ssd_xla``); ``"reference"``: the
  token-by-token ``lax.scan``;
* ``"pallas"`` (raises on a CPU target) and ``"pallas_interpret"`` (the kernel in interpret mode, any backend).
  ``gated_delta_rule`` has no Pallas kernel: both raise.

Under a mesh the kernels run per device through ``pallas_kernels.sharding.shard_map_call`` (batch over the batch
axes, heads over ``tensor``, time whole).
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels.common import accelerator_backend, check_impl, target_platform
from pallas_kernels.linear_scan import chunked, gdn_xla, gla_xla, kernel, ssd_xla
from pallas_kernels.linear_scan.checks import check_chunk_size, check_gdn, check_gla, check_ssd
from pallas_kernels.linear_scan.gdn_xla import gated_delta_rule_step
from pallas_kernels.linear_scan.gla_xla import gla_step
from pallas_kernels.linear_scan.ssd_xla import ssd_step
from pallas_kernels.sharding import shard_map_call

__all__ = [
    "gla",
    "gla_step",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "ssd",
    "ssd_step",
    "scan_kernel",
    "PALLAS_OPS",
]

# The ops with a Pallas kernel (``kernel.gla`` / ``kernel.ssd``).
PALLAS_OPS = frozenset({"gla", "ssd"})

_TOKENS = P("batch", None, "heads", None)  # [batch, time, heads, D]
_STATE = P("batch", "heads", None, None)  # [batch, heads, Dk, Dv]


def _wants_kernel(op: str, impl: str) -> bool:
    """Whether ``impl`` may run a Pallas kernel of ``op``; raises when it names one that ``op`` does not have."""
    if impl in ("xla", "cpu", "reference"):
        return False
    if op not in PALLAS_OPS:
        if impl == "auto":
            return False
        raise NotImplementedError(f"{op}: impl={impl!r}: this op has no Pallas kernel; use impl='xla' or 'auto'")
    return True


def _interpret(impl: str, op: str) -> bool | None:
    """``interpret`` of the Pallas kernel for ``impl``, or None for the XLA path."""
    if impl == "pallas_interpret":
        return True
    if impl == "pallas":
        if accelerator_backend() is None:
            raise NotImplementedError(
                f"{op}: impl='pallas' needs TPU or GPU devices (the program is compiled for {target_platform()!r}); "
                "use impl='pallas_interpret' to run the kernel in interpret mode, or impl='xla'"
            )
        return False
    if impl == "auto":
        return False if accelerator_backend() is not None else None
    return None


def _scan_dims(op_name, args, kw):
    """The sizes ``kernel.supports`` needs, from the op's arguments."""
    if op_name == "gla":
        q, v = args[0], args[2]
        dk, dv, t_len, chunk = q.shape[-1], v.shape[-1], q.shape[1], kw.get("chunk_size", 64)
    else:  # ssd: (x, dt, A, B, C, D)
        x, b = args[0], args[3]
        dk, dv, t_len, chunk = b.shape[-1], x.shape[-1], x.shape[1], kw.get("chunk_size", 64)
    return dict(dk=dk, dv=dv, t_len=t_len, chunk_size=chunk)


def scan_kernel(impl, op_name, *args, **kw):
    """The Pallas kernel of a gated linear scan for ``impl``, per device under a mesh, or ``None`` for the XLA path.

    ``op_name="gla"``: ``args = (q, k, v, log_gate)``, keywords ``scale``, ``initial_state``, ``chunk_size``;
    ``op_name="ssd"``: ``args = (x, dt, A, B, C, D)``, keywords ``initial_state``, ``chunk_size``.
    Returns ``(out, final_state)`` exactly like ``kernel.gla`` / ``kernel.ssd``, or ``None`` (``impl="xla"``, or
    ``"auto"`` on a CPU target or for shapes the target's kernel does not take).
    """
    if op_name not in PALLAS_OPS:
        raise ValueError(f"scan_kernel: unknown op {op_name!r}; choose one of {sorted(PALLAS_OPS)}")
    check_impl(op_name, impl)
    interpret = _interpret(impl, op_name)
    if interpret is None:
        return None
    backend = accelerator_backend()
    if impl == "auto" and not kernel.supports(
        op_name, backend=backend, interpret=interpret, **_scan_dims(op_name, args, kw)
    ):
        return None
    s0 = kw.pop("initial_state", None)
    fn = getattr(kernel, op_name)

    def local(*a):
        *a, s0 = a
        return fn(*a, initial_state=s0, interpret=interpret, backend=backend, **kw)

    if op_name == "gla":
        in_axes = (_TOKENS,) * 4
    else:  # ssd: (x, dt, A, B, C, D); B/C groups split like heads unless there is one group
        groups = None if args[3].shape[2] == 1 else "heads"
        in_axes = (
            _TOKENS,
            P("batch", None, "heads"),
            P("heads"),
            P("batch", None, groups, None),
            P("batch", None, groups, None),
            P("heads"),
        )
    return shard_map_call(local, *args, s0, in_axes=in_axes + (_STATE,), out_axes=(_TOKENS, _STATE))


def gla_kernel(impl, q, k, v, log_gate, **kw):
    """:func:`scan_kernel` for GLA (``scale``, ``initial_state``, ``chunk_size`` keywords)."""
    return scan_kernel(impl, "gla", q, k, v, log_gate, **kw)


def ssd_kernel(impl, x, dt, A, B, C, D=None, **kw):
    """:func:`scan_kernel` for SSD (``initial_state``, ``chunk_size`` keywords)."""
    return scan_kernel(impl, "ssd", x, dt, A, B, C, D, **kw)


def gla_uses_gpu_kernel(impl, q, v, chunk_size) -> bool:
    """Whether ``gla(..., impl=impl)`` runs the compiled Mosaic GPU GLA kernels (whose exponent range :func:`gla`
    then guards with ``kernel.gla_gpu_gates_ok``)."""
    if impl in ("xla", "cpu", "reference"):
        return False
    interpret = _interpret(impl, "gla")
    if interpret is None or interpret or accelerator_backend() != "gpu":
        return False
    if impl != "auto":
        return True
    return kernel.supports("gla", backend="gpu", **_scan_dims("gla", (q, None, v), {"chunk_size": chunk_size}))


def gla(q, k, v, log_gate, *, scale: float | None = None, initial_state=None, chunk_size: int = 64, impl: str = "auto"):
    """Gated linear attention over a whole sequence.

    Per head, with state ``S_t: [Dk, Dv]``: ``S_t = diag(exp(log_gate_t)) S_{t-1} + k_t v_t^T``,
    ``o_t = (scale * q_t)^T S_t``.

    Args:
      q, k: ``[batch, time, heads, key_dim]``.
      v: ``[batch, time, heads, value_dim]``.
      log_gate: ``[batch, time, heads, key_dim]``, log forget gates (``<= 0``).
      scale: query scale, default ``key_dim ** -0.5``.
      initial_state: optional ``[batch, heads, key_dim, value_dim]``.
      chunk_size: chunk length of the chunked form (any ``T`` works; short inputs use a smaller chunk).
      impl: see the module docstring.

    Returns:
      ``(o [batch, time, heads, value_dim], final_state [batch, heads, key_dim, value_dim] float32)``; ``o`` in q's
      dtype (v's on the Pallas kernels).
    """
    check_impl("gla", impl)
    check_chunk_size("gla", chunk_size)
    check_gla("gla", q, k, v, log_gate, initial_state)
    if impl == "reference":
        return gla_xla.gla_reference(q, k, v, log_gate, scale=scale, initial_state=initial_state)
    kw = dict(scale=chunked.query_scale(scale, q.shape[-1]), initial_state=initial_state, chunk_size=chunk_size)
    xla_form = lambda: gla_xla.gla_chunked(q, k, v, log_gate, scale, initial_state, chunk_size)
    if gla_uses_gpu_kernel(impl, q, v, chunk_size):
        # The Mosaic GPU kernels factor the diagonal sub-chunk blocks with exponents bounded by half a sub-chunk's
        # log-gate total (not non-positive); for gates beyond that bound this path runs the exact XLA form instead.
        def on_kernel():
            o, s = gla_kernel(impl, q, k, v, log_gate, **kw)
            return o.astype(q.dtype), s

        return jax.lax.cond(kernel.gla_gpu_gates_ok(log_gate, chunk_size=chunk_size), on_kernel, xla_form)
    out = gla_kernel(impl, q, k, v, log_gate, **kw) if _wants_kernel("gla", impl) else None
    return out if out is not None else xla_form()


def gated_delta_rule(
    q,
    k,
    v,
    log_decay,
    beta,
    *,
    scale: float | None = None,
    initial_state=None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    impl: str = "auto",
):
    """Gated delta rule over a whole sequence (``gdn_xla`` has the recurrence and its chunked form).

    Args:
      q, k: ``[batch, time, heads, key_dim]``; v: ``[batch, time, heads, value_dim]``.
      log_decay: ``[batch, time, heads]`` (``<= 0``); beta: ``[batch, time, heads]`` (write strength, in [0, 1]).
      scale: query scale, default ``key_dim ** -0.5`` (applied after the optional L2 norm).
      initial_state: optional ``[batch, heads, key_dim, value_dim]``.
      use_qk_l2norm: L2-normalise q and k per head first.
      chunk_size: chunk length of the chunked (UT-transform) form.
      impl: see the module docstring (no Pallas kernel).

    Returns:
      ``(o [batch, time, heads, value_dim] in q's dtype, final_state [batch, heads, key_dim, value_dim] float32)``.
    """
    check_impl("gated_delta_rule", impl)
    check_chunk_size("gated_delta_rule", chunk_size)
    check_gdn("gated_delta_rule", q, k, v, log_decay, beta, initial_state)
    if impl == "reference":
        return gdn_xla.gated_delta_rule_reference(
            q, k, v, log_decay, beta, scale=scale, initial_state=initial_state, use_qk_l2norm=use_qk_l2norm
        )
    _wants_kernel("gated_delta_rule", impl)
    return gdn_xla.gdn_chunked(q, k, v, log_decay, beta, scale, initial_state, use_qk_l2norm, chunk_size)


def ssd(x, dt, A, B, C, D=None, *, initial_state=None, chunk_size: int = 256, impl: str = "auto"):
    """The SSD scan over a whole sequence (``ssd_xla`` has the recurrence and its chunked form).

    Args:
      x: ``[batch, time, heads, head_dim]``.
      dt: ``[batch, time, heads]``, step sizes after softplus (``> 0``).
      A: ``[heads]``, negative.
      B, C: ``[batch, time, groups, state]``; ``groups`` divides ``heads``.
      D: optional ``[heads]`` skip connection.
      initial_state: optional ``[batch, heads, head_dim, state]``.
      chunk_size: chunk length of the chunked form.
      impl: see the module docstring.

    Returns:
      ``(y [batch, time, heads, head_dim] in x's dtype, final_state [batch, heads, head_dim, state] float32)``.
    """
    check_impl("ssd", impl)
    check_chunk_size("ssd", chunk_size)
    check_ssd("ssd", x, dt, A, B, C, D, initial_state)
    if impl == "reference":
        return ssd_xla.ssd_reference(x, dt, A, B, C, D, initial_state=initial_state)
    if _wants_kernel("ssd", impl):
        out = ssd_kernel(impl, x, dt, A, B, C, D, initial_state=initial_state, chunk_size=chunk_size)
        if out is not None:
            return out
    return ssd_xla.ssd_chunked(x, dt, A, B, C, D, initial_state, chunk_size)
