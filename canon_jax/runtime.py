"""Process-level settings for the command-line entry points (``python -m experiments.train``, the benchmarks).

:func:`use_malloc_hugepages` restarts the process once with glibc's ``glibc.malloc.hugetlb=1`` tunable. Why: XLA:CPU
allocates each execution's temporary buffers anew and frees them afterwards, and glibc serves such large blocks
with fresh ``mmap`` regions, so every training step first-touches (page-faults) its whole working set again, 4 KiB
at a time. On the 2-core development machine (a KVM guest) the 4-layer LlamaCanon benchmark step took about 140,000
page faults, ~15 % of its time (docs/benchmarks.md). With the tunable glibc asks for transparent huge pages
(``madvise(MADV_HUGEPAGE)``) on those regions: 2 MiB per fault, ~50x fewer faults, and the same results bit for bit.
The tunable is read only at process start, hence the restart (``os.execv``: same PID, same arguments, same
environment plus the tunable); it happens before JAX starts, once, and only where it can help (Linux, glibc ≥ 2.35,
transparent huge pages not ``never``). ``CANON_JAX_MALLOC_HUGEPAGES=0`` turns it off. Library code never calls this:
only the ``if __name__ == "__main__"`` blocks of the scripts do.
"""

from __future__ import annotations

import os
import platform
import sys

__all__ = ["use_malloc_hugepages", "malloc_hugepages_reason", "platform_reason"]

_TUNABLE = "glibc.malloc.hugetlb"
_DONE = "CANON_JAX_MALLOC_HUGEPAGES_SET"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def malloc_hugepages_reason() -> str | None:
    """None when :func:`use_malloc_hugepages` would restart this process, else why it would not."""
    if os.environ.get("CANON_JAX_MALLOC_HUGEPAGES", "1") == "0":
        return "disabled by CANON_JAX_MALLOC_HUGEPAGES=0"
    if os.environ.get(_DONE):
        return "already restarted with the tunable"
    if _TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return f"GLIBC_TUNABLES already sets {_TUNABLE}"
    why = platform_reason()
    if why is not None:
        return why
    if not sys.argv or sys.argv[0] in ("", "-", "-c"):
        return "not started from a script or module file (stdin or -c cannot be replayed)"
    if "jax" in sys.modules and _backend_started():
        return "JAX is already running in this process"
    return None


def platform_reason() -> str | None:
    """None when this machine supports the tunable (Linux, glibc >= 2.35, transparent huge pages not ``never``)."""
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


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # noqa: BLE001 - private API moved: assume it started, never restart a live process
        return True


def use_malloc_hugepages() -> None:
    """Restart this process with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` when that helps (see the module doc).

    Call it first thing in a script's ``if __name__ == "__main__":`` block. Returns normally (no restart) where it does
    not apply; otherwise it does not return.
    """
    if malloc_hugepages_reason() is not None:
        return
    env = dict(os.environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{tunables}:{_TUNABLE}=1" if tunables else f"{_TUNABLE}=1"
    env[_DONE] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    os.execve(sys.executable, argv, env)
