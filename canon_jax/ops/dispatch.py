"""Chooses the implementation behind an ``impl=`` switch.

``impl="auto"`` uses a Pallas kernel when the default backend is TPU or GPU and ``pallas_kernels`` provides one, and
returns ``None`` (meaning: use the XLA path) elsewhere. Naming an implementation that is not available raises.
"""
from __future__ import annotations

import importlib

import jax


def accelerator_backend() -> str | None:
    """``"tpu"``, ``"gpu"`` or ``None`` (CPU) for the default backend."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "tpu"
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    return None


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
                f"{op}: impl='pallas' needs a TPU or GPU backend (default backend is {jax.default_backend()!r}); "
                "use impl='pallas_interpret' to run the kernel in interpret mode, or impl='xla'")
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
    if impl == "auto" and not api.supports(interpret=r[1], segment_ids=kw.get("segment_ids")):
        return None
    return api.short_conv(x, weight, interpret=r[1], **kw)


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
    if impl == "auto" and not api.supports(op_name, interpret=r[1], **_scan_dims(op_name, args, kw)):
        return None
    return getattr(api, op_name)(*args, interpret=r[1], **kw)


def gla_uses_gpu_kernel(impl, q, v, chunk_size) -> bool:
    """Whether ``gla(impl, q, k, v, ...)`` runs the compiled Mosaic GPU GLA kernels (``canon_jax.ops.gla`` then guards
    their exponent range with ``pallas_kernels.linear_scan.gla_gpu_gates_ok``)."""
    r = _resolve(impl, "gla")
    if r is None or r[1] or accelerator_backend() != "gpu":
        return False
    if impl != "auto":
        return True
    api = _pallas_api("pallas_kernels.linear_scan", "gla")
    return api.supports("gla", **_scan_dims("gla", (q, None, v), {"chunk_size": chunk_size}))


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
