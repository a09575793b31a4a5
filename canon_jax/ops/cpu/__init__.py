"""Native XLA:CPU kernels through the XLA FFI (``canon_conv.cc``): the Canon causal conv, forward and backward.

XLA's CPU backend cannot fuse the time-shifted slices of a depthwise conv into the weight-gradient reductions, so the
pure-XLA backward materialises K shifted copies of the input (about 10x the cost of the forward). The native kernel
does the forward in one pass and the backward (dx, dw, dbias, d(history)) in two, split over channel blocks on XLA's
intra-op thread pool.

The shared library is compiled on first use with the system C++ compiler (``$CXX`` or ``c++``/``g++``) against
``jax.ffi.include_dir()`` and cached in ``$CANON_JAX_CACHE_DIR`` (default ``~/.cache/canon_jax``), keyed by the source,
the JAX version and the compiler. Where no compiler is available, :func:`available` is False with the reason in
:func:`unavailable_reason`; ``impl="auto"`` then uses the XLA path (and warns once), ``impl="cpu"`` raises.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import jax

__all__ = ["available", "unavailable_reason", "library_path", "FWD_TARGET", "BWD_TARGET"]

FWD_TARGET = "canon_jax_conv_fwd_f32"
BWD_TARGET = "canon_jax_conv_bwd_f32"
_SOURCE = pathlib.Path(__file__).with_name("canon_conv.cc")
_lock = threading.Lock()
_state: dict = {}


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("CANON_JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "canon_jax")
    return pathlib.Path(root)


# -O3 auto-vectorises the channel loops; -march=native lets them use the machine's widest vectors (AVX-512 doubles
# the kernels' speed over the SSE2 baseline on a Sapphire Rapids core). Compilers that reject it get the baseline.
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC"]
_NATIVE = ["-march=native"]


def _target_id(cxx: str) -> bytes:
    """What the compiler targets with -march=native (its predefined macros: __AVX512F__, __ARM_NEON, ...), so a cache
    directory shared by machines with different CPUs never hands one of them a library built for the other."""
    r = subprocess.run([cxx, *_NATIVE, "-E", "-dM", "-x", "c++", "-"], input="", capture_output=True, text=True)
    return (r.stdout if r.returncode == 0 else "no-march-native").encode()


def library_path(cxx: str) -> pathlib.Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join(
            [
                _SOURCE.read_bytes(),
                jax.__version__.encode(),
                version.encode(),
                os.uname().machine.encode(),
                " ".join(_FLAGS + _NATIVE).encode(),
                _target_id(cxx),
            ]
        )
    ).hexdigest()[:16]
    return _cache_dir() / f"canon_conv_{key}.so"


def _build(cxx: str, out: pathlib.Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # one compile per machine, even with parallel test workers
        if out.exists():
            return
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cxx, *_FLAGS, *_NATIVE, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:  # e.g. a compiler without -march=native: the portable baseline build
            cmd = [c for c in cmd if c not in _NATIVE]
            r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling {_SOURCE.name} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: a reader never sees a half-written library


def _load() -> None:
    if _state:
        return
    with _lock:
        if _state:
            return
        try:
            if sys.platform != "linux" and sys.platform != "darwin":
                raise RuntimeError(f"unsupported platform {sys.platform}")
            cxx = _compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set $CXX or install g++/clang++)")
            path = library_path(cxx)
            if not path.exists():
                _build(cxx, path)
            lib = ctypes.cdll.LoadLibrary(str(path))
            jax.ffi.register_ffi_target(FWD_TARGET, jax.ffi.pycapsule(lib.CanonConvFwd), platform="cpu")
            jax.ffi.register_ffi_target(BWD_TARGET, jax.ffi.pycapsule(lib.CanonConvBwd), platform="cpu")
            _state.update(ok=True, reason=None, path=path, lib=lib)
        except Exception as e:  # noqa: BLE001 - reported through unavailable_reason()/warnings, never swallowed
            _state.update(ok=False, reason=f"{type(e).__name__}: {e}")


def available() -> bool:
    """True when the native CPU conv kernels are compiled and registered (compiles them on first call)."""
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
