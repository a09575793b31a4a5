"""A/B benchmark of the native XLA:CPU Canon conv (``canon_jax/ops/cpu/canon_conv.cc``) against its source at another
git revision: forward and backward (``residual=True``, K=4) at the Llama step benchmark's shapes.

The other revision's source is compiled into a temporary library and registered under its own FFI target names, so
both kernels run in one process on the same inputs. Their timed windows alternate (ABBA), and the script prints the
median ms per call of each and the median over rounds of the new/old ratio (the paired ratio). The paired ratio is
the number to read on a shared VM, whose speed drifts by tens of percent within minutes. The outputs of the two
kernels are also compared.

    PYTHONPATH=. python -m experiments.bench_native_conv --against 3503f59
"""

from __future__ import annotations

import argparse
import ctypes
import pathlib
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from canon_jax.ops import cpu
from canon_jax.ops.cpu import build


def build_revision(rev: str, out_dir: pathlib.Path) -> pathlib.Path:
    """Compile ``canon_conv.cc`` as of git revision ``rev`` into ``out_dir``; returns the library path."""
    root = build.SOURCE.parent
    rel = build.SOURCE.relative_to(
        subprocess.check_output(["git", "rev-parse", "--show-toplevel"], cwd=root, text=True).strip()
    )
    src = out_dir / "canon_conv_other.cc"
    src.write_text(subprocess.check_output(["git", "show", f"{rev}:{rel}"], cwd=root, text=True))
    return build.build(out_dir / "canon_conv_other.so", source=src)


def _fwd(target):
    def f(x, w, b, p):
        out = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jax.ffi.ffi_call(target, out)(x, w, b, p, silu=np.int32(0), residual=np.int32(1))

    return jax.jit(f)


def _bwd(target):
    def f(g, x, w, b, p):
        out = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, w, b, p))
        return jax.ffi.ffi_call(target, out)(g, x, w, b, p, silu=np.int32(0), residual=np.int32(1))

    return jax.jit(f)


def ab(f_old, f_new, args, rounds: int, calls: int):
    """Median ms per call of each and the median paired new/old ratio, over ``rounds`` ABBA-ordered windows."""
    old, new = [], []
    for f in (f_old, f_new):
        jax.block_until_ready(f(*args))
    for r in range(rounds):
        for f, times in ((f_old, old), (f_new, new)) if r % 2 == 0 else ((f_new, new), (f_old, old)):
            t = time.perf_counter()
            for _ in range(calls):
                out = f(*args)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - t) / calls * 1e3)
    return statistics.median(old), statistics.median(new), statistics.median(n / o for o, n in zip(old, new))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="git revision whose canon_conv.cc is the baseline")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--channels", default="256,768", help="comma-separated channel counts")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args(argv)
    if not cpu.available():
        raise SystemExit(f"the native CPU kernel is unavailable: {cpu.unavailable_reason()}")
    with tempfile.TemporaryDirectory() as tmp:
        lib = ctypes.cdll.LoadLibrary(str(build_revision(args.against, pathlib.Path(tmp))))
    jax.ffi.register_ffi_target("canon_ab_other_fwd", jax.ffi.pycapsule(lib.CanonConvFwd), platform="cpu")
    jax.ffi.register_ffi_target("canon_ab_other_bwd", jax.ffi.pycapsule(lib.CanonConvBwd), platform="cpu")
    print(f"JAX {jax.__version__}; native conv: this checkout against {args.against}; B={args.batch} T={args.seq} K=4")
    for c in (int(v) for v in args.channels.split(",")):
        ks = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(ks[0], (args.batch, args.seq, c))
        g = jax.random.normal(ks[1], x.shape)
        w = jax.random.normal(ks[2], (4, c)) * 0.5
        b, p = jnp.zeros((c,)), jnp.zeros((args.batch, 3, c))
        for name, old, new, a in (
            ("forward", _fwd("canon_ab_other_fwd"), _fwd(cpu.FWD_TARGET), (x, w, b, p)),
            ("backward", _bwd("canon_ab_other_bwd"), _bwd(cpu.BWD_TARGET), (g, x, w, b, p)),
        ):
            for o, n in zip(jax.tree.leaves(old(*a)), jax.tree.leaves(new(*a))):
                np.testing.assert_allclose(np.asarray(n), np.asarray(o), rtol=1e-4, atol=1e-3)
            t_old, t_new, paired = ab(old, new, a, args.rounds, args.calls)
            print(
                f"C={c:5d} {name:8s}: {args.against} {t_old:7.3f} ms, this {t_new:7.3f} ms, "
                f"paired this/old {paired:.3f}"
            )


if __name__ == "__main__":
    main()
