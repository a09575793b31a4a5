"""Forward+backward time of the chunked linear-recurrence ops vs causal softmax attention, as T grows.

    PYTHONPATH=. python experiments/bench_linear.py                      # T = 1k, 2k, 4k, 8k
    PYTHONPATH=. python experiments/bench_linear.py --lengths 1024 2048 --repeats 5

Shapes: batch 1, 4 heads; gla / gated_delta_rule: key dim 64, value dim 128; ssd: head dim P = 128, state N = 64,
1 group; attention (``jax.nn.dot_product_attention``, causal, XLA): head dim 128 for q, k and v (it needs equal dims).
Timed: ``jax.grad`` of ``sum(out * w)`` w.r.t. every input, jitted, after one warm-up call; the median of
``--repeats`` runs is printed as a markdown table (milliseconds), with the ratio to the previous length.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from canon_jax import runtime
from canon_jax.ops import gated_delta_rule, gla, ssd

H, DK, DV, N = 4, 64, 128, 64


def make_case(name: str, t: int, chunk: int):
    r = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
    if name == "gla":
        args = (f(1, t, H, DK), f(1, t, H, DK), f(1, t, H, DV), -jnp.abs(f(1, t, H, DK)) * 0.1)
        fn = lambda q, k, v, g: gla(q, k, v, g, chunk_size=chunk, impl="xla")[0]
    elif name == "gated_delta_rule":
        args = (f(1, t, H, DK), f(1, t, H, DK), f(1, t, H, DV), -jnp.abs(f(1, t, H)) * 0.1, jax.nn.sigmoid(f(1, t, H)))
        fn = lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, use_qk_l2norm=True, chunk_size=chunk, impl="xla")[0]
    elif name == "ssd":
        args = (f(1, t, H, DV), jax.nn.softplus(f(1, t, H)), -jnp.exp(f(H)), f(1, t, 1, N), f(1, t, 1, N), f(H))
        fn = lambda x, dt, a, b, c, d: ssd(x, dt, a, b, c, d, chunk_size=chunk, impl="xla")[0]
    elif name == "attention":
        args = (f(1, t, H, DV), f(1, t, H, DV), f(1, t, H, DV))
        fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    else:
        raise ValueError(f"unknown op {name!r}")
    w = f(*jax.eval_shape(fn, *args).shape)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=tuple(range(len(args)))))
    return grad, args


def time_case(grad, args, repeats: int) -> float:
    jax.block_until_ready(grad(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--ops", nargs="+", default=["gla", "gated_delta_rule", "ssd", "attention"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=64, help="chunk size of the linear ops")
    a = p.parse_args(argv)
    runtime.print_hint(jax.default_backend())
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    print("| op | " + " | ".join(f"T={t}" for t in a.lengths) + " |")
    print("|---|" + "---|" * len(a.lengths))
    for name in a.ops:
        cells, prev = [], None
        for t in a.lengths:
            ms = time_case(*make_case(name, t, a.chunk), a.repeats)
            cells.append(f"{ms:.0f} ms" + (f" (x{ms / prev:.1f})" if prev else ""))
            prev = ms
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
