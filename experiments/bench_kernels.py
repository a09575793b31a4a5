"""Benchmark of the Pallas kernels against their XLA paths.

conv: achieved GB/s of forward and forward+backward next to a plain copy of x (the bandwidth ceiling).
scan: ms and achieved TFLOP/s (nominal chunked FLOPs) of forward and forward+backward next to the XLA chunked path
and ``jax.nn.dot_product_attention`` (causal).

On a machine without TPU/GPU only the XLA paths run, at small sizes (the Pallas kernels would run in interpret
mode, which measures nothing about kernel speed).

    PYTHONPATH=. python experiments/bench_kernels.py            # everything the device supports
    PYTHONPATH=. python experiments/bench_kernels.py --what conv --reps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from canon_jax import runtime
from canon_jax.ops import gla as ops_gla
from pallas_kernels.common import accelerator_backend
from pallas_kernels.linear_scan import gla as gla_kernel
from pallas_kernels.short_conv import reference as conv_ref
from pallas_kernels.short_conv import short_conv


def _time(fn, *args, reps):
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _conv_xla(x, w):
    return (x.astype(jnp.float32) + conv_ref.conv_pre_xla(x, w, None, None, None)).astype(x.dtype)


def bench_conv(accel, reps):
    shapes = [(1, 4096, 2048), (1, 4096, 16384), (8, 4096, 2048)] if accel else [(1, 512, 256), (2, 1024, 512)]
    print("| shape (B,T,D) bf16, K=4, residual | path | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
        w = jax.random.normal(jax.random.key(1), (4, shape[2]), jnp.float32) * 0.5
        n = x.size * x.dtype.itemsize
        paths = {"copy of x": lambda x, w: x * jnp.asarray(1, x.dtype), "xla": _conv_xla}
        if accel:
            paths["pallas"] = lambda x, w: short_conv(x, w, residual=True)
        for name, fn in paths.items():
            fwd = jax.jit(fn)
            t_f = _time(fwd, x, w, reps=reps)
            # bytes: forward reads x, writes y (2N); backward reads x and dy, writes dx (3N) -> 5N in all
            if name == "copy of x":
                print(f"| {shape} | {name} | {t_f * 1e3:.3f} | {2 * n / t_f / 1e9:.1f} | - | - |")
                continue
            fb = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32)), argnums=(0, 1)))
            t_fb = _time(fb, x, w, reps=reps)
            print(
                f"| {shape} | {name} | {t_f * 1e3:.3f} | {2 * n / t_f / 1e9:.1f} | {t_fb * 1e3:.3f} | "
                f"{5 * n / t_fb / 1e9:.1f} |"
            )


def _scan_flops(b, t, h, dk, dv, chunk):
    # per token: q k^T and (A) v inside its chunk, q S and the state update -> 2C(Dk+Dv) + 4 Dk Dv
    return b * h * t * (2 * chunk * (dk + dv) + 4 * dk * dv)


def bench_scan(accel, reps):
    if accel:
        b, h, dk, dv, lengths = 1, 16, 128, 256, (2048, 4096, 8192, 16384)
    else:
        b, h, dk, dv, lengths = 1, 2, 32, 64, (256, 512)
    chunk = 64
    print(
        f"| T (B={b}, H={h}, Dk={dk}, Dv={dv}, bf16, chunk {chunk}) | path | fwd ms | fwd TFLOP/s | fwd+bwd ms | "
        "fwd+bwd TFLOP/s |"
    )
    print("|---|---|---|---|---|---|")
    for t in lengths:
        ks = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(ks[0], (b, t, h, dk), jnp.bfloat16)
        k = jax.random.normal(ks[1], (b, t, h, dk), jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, t, h, dv), jnp.bfloat16)
        g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, dk), jnp.float32)) / 16

        def xla_chunked(q, k, v, g):
            return ops_gla(q, k, v, g, chunk_size=chunk, impl="xla")[0]

        def attention(q, k, v, g):
            return jax.nn.dot_product_attention(q, k, v[..., :dk], is_causal=True)

        paths = {"xla chunked": xla_chunked, "dot_product_attention": attention}
        if accel:
            # TPU: the Pallas scan; GPU: the Mosaic GPU wgmma kernels (docs/kernels.md). Same call: gla() picks the
            # device's family.
            paths["pallas"] = lambda q, k, v, g: gla_kernel(q, k, v, g, chunk_size=chunk)[0]
        if accel and accelerator_backend() == "gpu":
            from pallas_kernels.linear_scan import gpu as scan_gpu

            # Scalar gates (the SSD kernel family): same shapes, one gate per (token, head).
            paths["pallas, scalar gates (Mosaic GPU SSD kernels)"] = lambda q, k, v, g: scan_gpu.scalar_scan(
                q, k, v, g[..., 0], jnp.zeros((b, h, dk, dv), jnp.float32), chunk, 64, None
            )[0]
        flops = _scan_flops(b, t, h, dk, dv, chunk)
        for name, fn in paths.items():
            t_f = _time(jax.jit(fn), q, k, v, g, reps=reps)
            fb = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3)))
            t_fb = _time(fb, q, k, v, g, reps=reps)
            note = " (attention FLOPs differ; time only)" if name == "dot_product_attention" else ""
            print(
                f"| {t} | {name}{note} | {t_f * 1e3:.2f} | {flops / t_f / 1e12:.4f} | {t_fb * 1e3:.2f} | "
                f"{3 * flops / t_fb / 1e12:.4f} |"
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=("conv", "scan", "all"), default="all")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    runtime.print_hint(jax.default_backend())
    accel = accelerator_backend() is not None
    print(f"# device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if not accel:
        print("# no accelerator: XLA paths only, small sizes; Pallas kernel speed unmeasured")
    if args.what in ("conv", "all"):
        bench_conv(accel, args.reps)
    if args.what in ("scan", "all"):
        bench_scan(accel, args.reps)


if __name__ == "__main__":
    main()
