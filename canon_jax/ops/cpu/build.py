"""Compile the native CPU conv (``canon_conv.cc``) into a shared library next to this file.

Runs at install time (``setup.py``'s optional extension, inside pip's build environment: only the standard library
and ``jaxlib``'s bundled XLA FFI headers are needed), and on demand from a source checkout or after installing
without a C++ compiler: ``canon-build-native`` (``python -m canon_jax.ops.cpu.build``).

The default flags are ``-O3 -march=native``: the channel loops auto-vectorise to the widest vectors of the machine
that builds (AVX-512 doubles the kernels' speed over the SSE2 baseline on a Sapphire Rapids core), falling back to
the portable baseline for compilers that reject ``-march=native``. A library built on one machine is for that
machine; to build a wheel for others set ``CANON_JAX_NATIVE_FLAGS`` (e.g. ``-march=x86-64-v3``), which replaces
``-march=native``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile

SOURCE = pathlib.Path(__file__).with_name("canon_conv.cc")
LIBRARY_NAME = "_canon_conv"
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC"]


def library_filename() -> str:
    return LIBRARY_NAME + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def default_library_path() -> pathlib.Path:
    return SOURCE.with_name(library_filename())


def compiler() -> str | None:
    """``$CXX``, else the first of ``c++``, ``g++``, ``clang++`` on the PATH."""
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def include_dir() -> str:
    """jaxlib's bundled XLA FFI headers (what ``jax.ffi.include_dir()`` returns), found without importing jax."""
    import jaxlib

    root = jaxlib.__file__ and os.path.dirname(os.path.abspath(jaxlib.__file__)) or list(jaxlib.__path__)[0]
    return os.path.join(root, "include")


def source_hash(source: pathlib.Path = SOURCE) -> str:
    """What the library records of the source it was built from (checked when it is loaded)."""
    return hashlib.sha256(pathlib.Path(source).read_bytes()).hexdigest()[:16]


def target_flags() -> list[str]:
    flags = os.environ.get("CANON_JAX_NATIVE_FLAGS")
    return flags.split() if flags is not None else ["-march=native"]


def build(
    out: pathlib.Path | str | None = None, cxx: str | None = None, source: pathlib.Path | str = SOURCE
) -> pathlib.Path:
    """Compile the library from ``source`` (default: the package's ``canon_conv.cc``) to ``out`` (default: next to
    the source, where the package loads it). Raises RuntimeError naming the command and the compiler's error when it
    cannot be built."""
    source = pathlib.Path(source)
    out = pathlib.Path(out) if out is not None else default_library_path()
    cxx = cxx or compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++/clang++)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *BASE_FLAGS, *target_flags(), f'-DCANON_CONV_SOURCE_HASH="{source_hash(source)}"', "-I", include_dir()]
    cmd += [str(source), "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 and "CANON_JAX_NATIVE_FLAGS" not in os.environ:
        cmd = [c for c in cmd if c != "-march=native"]  # a compiler without -march=native: the portable baseline
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    os.chmod(tmp, 0o755)  # mkstemp's file is private; the library is read by whoever imports the package
    os.replace(tmp, out)  # atomic: a process loading the library never sees a half-written file
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help=f"output path (default: {default_library_path()})")
    args = p.parse_args(argv)
    try:
        path = build(args.out)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
