"""A process-level setting for training on CPU: glibc's transparent-huge-page malloc tunable.

XLA:CPU allocates each execution's temporary buffers anew and frees them afterwards, and glibc serves such large
blocks with fresh ``mmap`` regions, so every training step first-touches (page-faults) its whole working set again,
4 KiB at a time. On the 2-core development machine (a KVM guest) the 4-layer LlamaCanon benchmark step took about
140,000 page faults, ~15 % of its time (docs/benchmarks.md). With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` glibc
asks for transparent huge pages (``madvise(MADV_HUGEPAGE)``) on those regions: 2 MiB per fault, ~50x fewer faults,
and the same results bit for bit.

glibc reads the tunable only at process start, so it is a launcher setting, exported by the user::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 canon-train --config configs/quickstart.yaml --workdir runs/quickstart

It helps only XLA:CPU (on TPU/GPU hosts the step's buffers live in device memory). ``canon-train``, ``canon-demo``
and the CPU benchmarks print :func:`malloc_hugepages_hint` once when they run on CPU on a machine that supports it
without it; ``CANON_JAX_MALLOC_HUGEPAGES=0`` silences the hint.
"""

from __future__ import annotations

import os
import platform
import sys

__all__ = ["SETTING", "malloc_hugepages_active", "malloc_hugepages_hint", "platform_reason", "print_hint"]

SETTING = "GLIBC_TUNABLES=glibc.malloc.hugetlb=1"
_TUNABLE = "glibc.malloc.hugetlb"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def malloc_hugepages_active() -> bool:
    """True when this process was started with the tunable set to a non-zero value."""
    for item in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name == _TUNABLE:
            return value not in ("", "0")
    return False


def platform_reason() -> str | None:
    """None when this machine supports the tunable (Linux, glibc >= 2.35, transparent huge pages not ``never``), else
    why not."""
    if sys.platform != "linux":
        return f"not Linux ({sys.platform})"
    lib, version = platform.libc_ver()
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return f"unknown C library ({lib!r} {version!r})"
    if lib != "glibc" or (major, minor) < (2, 35):
        return f"needs glibc >= 2.35 (found {lib} {version})"
    try:
        with open(_THP) as f:
            if "[never]" in f.read():
                return "transparent huge pages are disabled on this machine ([never])"
    except OSError:
        return f"{_THP} is not readable"
    return None


def malloc_hugepages_hint(backend: str) -> str | None:
    """The one-line suggestion to start the process with the tunable, or None where it would not help or is set.

    Args:
      backend: the platform the process computes on (``jax.default_backend()``); only ``"cpu"`` gets a hint.
    """
    if backend != "cpu" or malloc_hugepages_active() or _TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if os.environ.get("CANON_JAX_MALLOC_HUGEPAGES", "1") == "0" or platform_reason() is not None:
        return None
    return (
        f"hint: start with {SETTING} for ~10-15 % faster CPU steps (fewer page faults in XLA:CPU; see "
        "canon_jax/runtime.py); CANON_JAX_MALLOC_HUGEPAGES=0 silences this"
    )


def print_hint(backend: str) -> None:
    """Print :func:`malloc_hugepages_hint` (if any) on stderr."""
    hint = malloc_hugepages_hint(backend)
    if hint:
        print(hint, file=sys.stderr, flush=True)
