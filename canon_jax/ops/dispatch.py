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
    r = _resolve(impl, "causal_conv1d")
    if r is None:
        return None
    api = _pallas_api("pallas_kernels.short_conv", "causal_conv1d")
    if not hasattr(api, "short_conv"):
        if impl == "auto":
            return None
        raise NotImplementedError("causal_conv1d: pallas_kernels.short_conv.short_conv is not implemented yet")
    return api.short_conv(x, weight, interpret=r[1], **kw)
