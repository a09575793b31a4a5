"""Native XLA:CPU kernels through the XLA FFI (``canon_conv.cc``): the Canon causal conv, forward and backward.

XLA's CPU backend cannot fuse the time-shifted slices of a depthwise conv into the weight-gradient reductions, so the
pure-XLA backward materialises K shifted copies of the input (about 10x the cost of the forward). The native kernel
does the forward in one pass and the backward (dx, dw, dbias, d(history)) in two, split over channel blocks on XLA's
intra-op thread pool.

The shared library is built when the package is installed (an optional extension: ``pip install`` builds it where a
C++ compiler is found, tuned to the installing machine with ``-march=native``) or by ``canon-build-native``
(:mod:`canon_jax.ops.cpu.build`, e.g. in a source checkout). This module only loads it. Where it is missing, or was
built from another version of ``canon_conv.cc``, :func:`available` is False with the reason in
:func:`unavailable_reason`; ``impl="auto"`` then uses the XLA path (and warns once), ``impl="cpu"`` raises.
``CANON_JAX_DISABLE_CPU_KERNELS=1`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings

import jax

__all__ = ["available", "unavailable_reason", "library_path", "FWD_TARGET", "BWD_TARGET"]

FWD_TARGET = "canon_jax_conv_fwd_f32"
BWD_TARGET = "canon_jax_conv_bwd_f32"
_lock = threading.Lock()
_state: dict = {}
_REBUILD = "build it with `canon-build-native` (or reinstall canon-jax on a machine with a C++ compiler)"


def library_path():
    """Where the package loads the native library from (next to ``canon_conv.cc``)."""
    from canon_jax.ops.cpu.build import default_library_path

    return default_library_path()


def _load() -> None:
    if _state:
        return
    with _lock:
        if _state:
            return
        from canon_jax.ops.cpu.build import source_hash

        path = library_path()
        try:
            if not path.exists():
                raise RuntimeError(f"the native library {path.name} is not built; {_REBUILD}")
            lib = ctypes.cdll.LoadLibrary(str(path))
            lib.CanonConvSourceHash.restype = ctypes.c_char_p
            built_from = lib.CanonConvSourceHash().decode()
            if built_from != source_hash():
                raise RuntimeError(f"{path.name} was built from another version of canon_conv.cc; {_REBUILD}")
            jax.ffi.register_ffi_target(FWD_TARGET, jax.ffi.pycapsule(lib.CanonConvFwd), platform="cpu")
            jax.ffi.register_ffi_target(BWD_TARGET, jax.ffi.pycapsule(lib.CanonConvBwd), platform="cpu")
            _state.update(ok=True, reason=None, path=path, lib=lib)
        except (OSError, AttributeError, RuntimeError) as e:  # reported through unavailable_reason() and a warning
            _state.update(ok=False, reason=f"{type(e).__name__}: {e}")


def available() -> bool:
    """True when the native CPU conv kernels are built and registered."""
    if os.environ.get("CANON_JAX_DISABLE_CPU_KERNELS"):
        return False
    _load()
    return _state["ok"]


def unavailable_reason() -> str | None:
    if os.environ.get("CANON_JAX_DISABLE_CPU_KERNELS"):
        return "disabled by $CANON_JAX_DISABLE_CPU_KERNELS"
    _load()
    return _state["reason"]


def warn_fallback_once() -> None:
    if not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(
            f"canon_jax: native CPU conv kernel unavailable ({unavailable_reason()}); using the slower XLA path",
            RuntimeWarning,
            stacklevel=3,
        )
