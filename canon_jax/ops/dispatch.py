"""Chooses the implementation behind an ``impl=`` switch, and runs the chosen kernel on the mesh.

``impl="auto"`` uses a Pallas kernel when the program is compiled for TPU or GPU devices (the devices of the
trace-time mesh, else the default backend: :func:`canon_jax.ops.sharded.target_platform`) and ``pallas_kernels``
provides one, and returns ``None`` (meaning: use the XLA path) elsewhere. Naming an implementation that is not
available raises. Under a mesh every kernel call runs per device through :func:`canon_jax.ops.sharded.shard_map_call`
(batch over the batch axes, channels/heads over ``tensor``, time whole).
"""

from __future__ import annotations

import importlib

from jax.sharding import PartitionSpec as P

from pallas_kernels.common import accelerator_backend, target_platform
from pallas_kernels.sharding import shard_map_call


def _pallas_api(module: str, op: str):
    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the install
        raise NotImplementedError(f"{op}: the Pallas implementation is not available ({e})") from e
    return mod


def _resolve(impl: str, op: str) -> tuple[bool, bool] | None:
    """Returns (use_pallas, interpret) or None for the XLA path."""
    if impl == "xla":
        return None
    if impl == "pallas_interpret":
        return True, True
    if impl == "pallas":
        if accelerator_backend() is None:
            raise NotImplementedError(
                f"{op}: impl='pallas' needs TPU or GPU devices (the program is compiled for {target_platform()!r}); "
                "use impl='pallas_interpret' to run the kernel in interpret mode, or impl='xla'"
            )
        return True, False
    if impl == "auto":
        return (True, False) if accelerator_backend() is not None else None
    raise ValueError(f"{op}: unknown impl {impl!r}")


def short_conv(impl, x, weight, **kw):
    """``y`` from the Pallas short-conv kernel, or ``None`` for the XLA path (``impl="xla"``, or ``"auto"`` on CPU
    or when the device's kernel does not cover the call, see ``pallas_kernels.short_conv.supports``)."""
    r = _resolve(impl, "causal_conv1d")
    if r is None:
        return None
    api = _pallas_api("pallas_kernels.short_conv", "causal_conv1d")
    backend = accelerator_backend()
    if impl == "auto" and not api.supports(backend=backend, interpret=r[1], segment_ids=kw.get("segment_ids")):
        return None
    opts = {n: kw.pop(n) for n in ("bias", "segment_ids", "initial_state") if n in kw}

    def local(x, weight, bias, segment_ids, initial_state):
        return api.short_conv(
            x,
            weight,
            bias=bias,
            segment_ids=segment_ids,
            initial_state=initial_state,
            interpret=r[1],
            backend=backend,
            **kw,
        )

    return shard_map_call(
        local,
        x,
        weight,
        opts.get("bias"),
        opts.get("segment_ids"),
        opts.get("initial_state"),
        in_axes=CONV_AXES,
        out_axes=P("batch", None, "channels"),
    )


# Logical axes of the conv's (x, weight, bias, segment_ids, initial_state) and of the scans' arguments.
CONV_AXES = (
    P("batch", None, "channels"),
    P(None, "channels"),
    P("channels"),
    P("batch", None),
    P("batch", "channels", None),
)
_TOKENS = P("batch", None, "heads", None)  # [batch, time, heads, D]
_STATE = P("batch", "heads", None, None)  # [batch, heads, Dk, Dv]


LINEAR_SCAN_OPS = ("gla", "ssd")


def linear_scan(impl, op_name, *args, **kw):
    """Routes a gated linear scan to the Pallas kernel, or returns ``None`` for the XLA path.

    ``op_name="gla"``: ``args = (q, k, v, log_gate)``, keywords ``scale``, ``initial_state``, ``chunk_size``;
    ``op_name="ssd"``: ``args = (x, dt, A, B, C, D)``, keywords ``initial_state``, ``chunk_size``.
    Returns ``(out, final_state)`` exactly like ``pallas_kernels.linear_scan.gla`` / ``ssd``, or ``None``.
    ``impl="auto"`` uses the kernel on TPU, and on GPU the Mosaic GPU wgmma kernels (``ssd``: scalar gates;
    ``gla``: vector gates; forward and backward) whenever they take the shapes (``pallas_kernels.linear_scan.supports``:
    Dk a multiple of 64, Dv of ``block_dv``, chunk of 64), else XLA. The GPU kernels lower and are value-checked in
    the Mosaic GPU interpreter but have not been compiled or run on a GPU yet (docs/kernels.md); ``impl="xla"``
    (``ModelConfig.kernel_impl``) keeps a model on the XLA path.
    """
    if op_name not in LINEAR_SCAN_OPS:
        raise ValueError(f"linear_scan: unknown op {op_name!r}; choose one of {LINEAR_SCAN_OPS}")
    r = _resolve(impl, op_name)
    if r is None:
        return None
    api = _pallas_api("pallas_kernels.linear_scan", op_name)
    backend = accelerator_backend()
    if impl == "auto" and not api.supports(op_name, backend=backend, interpret=r[1], **_scan_dims(op_name, args, kw)):
        return None
    s0 = kw.pop("initial_state", None)
    kernel = getattr(api, op_name)

    def local(*a):
        *a, s0 = a
        return kernel(*a, initial_state=s0, interpret=r[1], backend=backend, **kw)

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


def gla_uses_gpu_kernel(impl, q, v, chunk_size) -> bool:
    """Whether ``gla(impl, q, k, v, ...)`` runs the compiled Mosaic GPU GLA kernels (``canon_jax.ops.gla`` then guards
    their exponent range with ``pallas_kernels.linear_scan.gla_gpu_gates_ok``)."""
    r = _resolve(impl, "gla")
    if r is None or r[1] or accelerator_backend() != "gpu":
        return False
    if impl != "auto":
        return True
    api = _pallas_api("pallas_kernels.linear_scan", "gla")
    return api.supports("gla", backend="gpu", **_scan_dims("gla", (q, None, v), {"chunk_size": chunk_size}))


def _scan_dims(op_name, args, kw):
    """The sizes ``pallas_kernels.linear_scan.supports`` needs, from the op's arguments."""
    if op_name == "gla":
        q, v = args[0], args[2]
        dk, dv, t_len, chunk = q.shape[-1], v.shape[-1], q.shape[1], kw.get("chunk_size", 64)
    else:  # ssd: (x, dt, A, B, C, D)
        x, b = args[0], args[3]
        dk, dv, t_len, chunk = b.shape[-1], x.shape[-1], x.shape[1], kw.get("chunk_size", 64)
    return dict(dk=dk, dv=dv, t_len=t_len, chunk_size=chunk)


def gla(impl, q, k, v, log_gate, **kw):
    """Hook called by ``canon_jax.ops.gla`` (``scale``, ``initial_state``, ``chunk_size`` keywords)."""
    return linear_scan(impl, "gla", q, k, v, log_gate, **kw)


def ssd(impl, x, dt, A, B, C, D=None, **kw):
    """Hook called by ``canon_jax.ops.ssd`` (``initial_state``, ``chunk_size`` keywords)."""
    return linear_scan(impl, "ssd", x, dt, A, B, C, D, **kw)
