"""Benchmark of the Lano grammar tools: membership (single strings and batches, valid and corrupted), the true
next-token distribution, and sampling.

    PYTHONPATH=. python experiments/bench_lano.py                 # cfg3f and cfg3k, 1000-string batches
    PYTHONPATH=. python experiments/bench_lano.py --cfgs cfg3f --batch 200 --singles 10

Prints a markdown table: wall-clock and process CPU seconds per string (on a shared machine the CPU column is the
better estimate of the single-core cost). Single-threaded numpy work; pin BLAS threads with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from canon_jax.data.lano_grammar import CFG


def corrupt(g: CFG, rng: np.random.Generator, s: list[int]) -> list[int]:
    """One random edit: substitution, insertion, deletion or truncation."""
    i = int(rng.integers(len(s)))
    kind = int(rng.integers(4))
    if kind == 0:
        s = list(s)
        s[i] = (s[i] - 1 + int(rng.integers(1, g.num_sym))) % g.num_sym + 1  # a different terminal
        return s
    if kind == 1:
        return s[:i] + [int(rng.integers(1, g.num_sym + 1))] + s[i:]
    if kind == 2:
        return s[:i] + s[i + 1 :]
    return s[: max(i, 1)]


def per_string(fn, items) -> tuple[float, float]:
    """(wall, CPU) seconds per item, calling ``fn`` on one item at a time."""
    t0, c0 = time.perf_counter(), time.process_time()
    for it in items:
        fn(it)
    return (time.perf_counter() - t0) / len(items), (time.process_time() - c0) / len(items)


def batched(fn, items) -> tuple[float, float]:
    """(wall, CPU) seconds per item, one call on the whole batch."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(items)
    return (time.perf_counter() - t0) / len(items), (time.process_time() - c0) / len(items)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfgs", nargs="+", default=["cfg3f", "cfg3k"])
    ap.add_argument("--batch", type=int, default=1000, help="strings per batched membership call")
    ap.add_argument("--singles", type=int, default=20, help="strings timed one at a time")
    ap.add_argument("--bitset-batch", type=int, default=100, help="batch size for the bitset-only row")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    print(f"numpy {np.__version__}, Python {platform.python_version()}, {platform.machine()}")
    rows = []
    for name in args.cfgs:
        g = CFG.load(name)
        rng = np.random.default_rng(args.seed)
        g.accepts([g.sample(rng)])  # warm caches
        valid = g.sample_batch(rng, args.batch)
        bad = [corrupt(g, rng, s) for s in valid]
        rand = [list(rng.integers(1, g.num_sym + 1, len(s))) for s in valid]
        n_single = args.singles
        verdict_bad = g.accepts(bad)
        mean_len = np.mean([len(s) for s in valid])

        def row(what, secs):
            rows.append((name, what, secs))

        row("accepts, 1 string at a time, valid", per_string(lambda s: g.accepts([s]), valid[:n_single]))
        row("accepts, 1 string at a time, corrupted", per_string(lambda s: g.accepts([s]), bad[:n_single]))
        row(f"accepts, batch of {args.batch}, valid", batched(g.accepts, valid))
        row(f"accepts, batch of {args.batch}, corrupted", batched(g.accepts, bad))
        row(f"accepts, batch of {args.batch}, random strings", batched(g.accepts, rand))
        row(
            "accepts bitset-only, 1 string at a time, valid",
            per_string(lambda s: g.accepts([s], method="bitset"), valid[: max(n_single // 4, 1)]),
        )
        row(
            f"accepts bitset-only, batch of {args.bitset_batch}, valid",
            batched(lambda b: g.accepts(b, method="bitset"), valid[: args.bitset_batch]),
        )
        periodic = [[1, 2] * (int(mean_len) // 2)]
        row(f"accepts, periodic '1 2 1 2 ...' (len {len(periodic[0])}, auto -> bitset)", batched(g.accepts, periodic))
        row("next_token_logprobs, valid string", per_string(g.next_token_logprobs, valid[:n_single]))
        row("sample (one string)", per_string(lambda _: g.sample(rng), range(200)))
        row(f"sample_batch ({args.batch} strings)", batched(lambda b: g.sample_batch(rng, len(b)), valid))
        rows.append(
            (
                name,
                f"(mean length {mean_len:.0f}; {int((~verdict_bad).sum())}/{len(bad)} corrupted strings rejected)",
                None,
            )
        )

    print("\n| cfg | measurement | wall s / string | CPU s / string |\n|---|---|---|---|")
    for name, what, secs in rows:
        wall, cpu = ("", "") if secs is None else (f"{secs[0]:.2e}", f"{secs[1]:.2e}")
        print(f"| {name} | {what} | {wall} | {cpu} |")


if __name__ == "__main__":
    main()
