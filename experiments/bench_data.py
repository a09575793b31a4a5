"""Synthetic-data generation throughput: samples/s and tokens/s per task, single process, one core.

    PYTHONPATH=. python experiments/bench_data.py [--seconds 2] [--tasks depo1 brevo1 mano ...] [--pipeline]

Each task is timed on consecutive sample indices of the train (and test) split after a short warm-up; ``--pipeline``
also times the full grain pipeline (mixture -> shuffle -> packing -> batching, no workers) in windows/s.
Mano and Lano generate aligned blocks of indices at once (1024 / 64); the "stride 8" rows read every 8th index, as
one of 8 data consumers (processes x workers) does, so 7/8 of each generated block is wasted there.
Official-generator reference targets (per core): Depo1 train ~900 samples/s, Brevo1 ~3,000, Mano L=10 ~30,000.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from canon_jax.data import DataConfig, get_task, make_dataset

CASES = [
    ("depo1", {}, "train", 1),
    ("depo1", {}, "test", 1),
    ("depo2", {}, "train", 1),
    ("brevo1", {}, "train", 1),
    ("brevo1", {}, "test", 1),
    ("brevo2", {}, "train", 1),
    ("mano", {}, "train", 1),
    ("mano", {}, "test", 1),
    ("mano", {}, "train", 8),
    ("mano", {"ops": "asmd"}, "train", 1),
    ("capo", {}, "train", 1),
    ("lano", {"cfg": "cfg3f"}, "train", 1),
    ("lano", {"cfg": "cfg3f"}, "train", 8),
    ("lano", {"cfg": "cfg3k"}, "train", 1),
]


def bench_task(name, params, split, seconds, stride=1):
    try:
        task = get_task(name, **params)
    except ImportError as e:  # lano needs the grammar module
        return None, str(e)
    for i in range(5):
        task.sample(i, split, 0)
    n = tok = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        s = task.sample((1 << 20) + stride * n, split, 0)
        n += 1
        tok += len(s)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    # per core = per CPU-second of this process (robust to other processes sharing the cores); wall shown too
    return (n / dc, tok / dc, tok / n, n / dt), None


def _naive_mano_expr(l, R):
    if l == 0:
        v = R.randint(0, 22)
        return [5000 + v], v
    op = R.choice("asm")
    tok = {"a": 1, "s": 2, "m": 3}[op] + R.choice([0, 4])
    l1 = R.randint(0, l - 1)
    a, va = _naive_mano_expr(l1, R)
    b, vb = _naive_mano_expr(l - 1 - l1, R)
    v = (va + vb) % 23 if op == "a" else (va - vb) % 23 if op == "s" else (va * vb) % 23
    return [tok] + a + b, v


def bench_naive_mano(seconds):
    """Calibration: a plain recursive Mano generator in the style the paper describes (random.randint per draw, one
    random.Random per sample, official ids, no numpy) timed on this machine, to compare against canon-jax's Mano
    under the same load."""
    import random

    n, tok, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        R = random.Random(n)
        l = R.randint(1, 10)
        e, v = _naive_mano_expr(l, R)
        seq = [R.choice([9999, 9998]), 10 * l + R.choice([0, 1])] + e + [10 * l + R.choice([4, 5]), 5000 + v]
        n += 1
        tok += len(seq)
    return n / (time.process_time() - c0), tok / (time.process_time() - c0), tok / n, n / (time.perf_counter() - t0)


def bench_pipeline(seconds, tasks=("depo1", "brevo1", "mano"), process_count=1):
    """(windows/s CPU, samples/s CPU, windows/s wall) of the full pipeline of process ``process_count - 1``."""
    cfg = DataConfig(tasks=[{"name": t} for t in tasks], seq_len=4096)
    it = iter(
        make_dataset(cfg, split="train", batch_size=1, process_index=process_count - 1, process_count=process_count)
    )
    next(it)
    n = samples = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += 1
        samples += int(b["segment_ids"].max())  # samples (segments) packed into the window
    dc = time.process_time() - c0
    return n / dc, samples / dc, n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--tasks", nargs="*", default=None)
    ap.add_argument("--pipeline", action="store_true")
    a = ap.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus visible, python "
        f"{platform.python_version()}, load avg {os.getloadavg()[0]:.1f}"
    )
    print("| task | params | split | samples/s (CPU) | tokens/s (CPU) | mean tokens | samples/s (wall) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, params, split, stride in CASES:
        if a.tasks and name not in a.tasks:
            continue
        r, err = bench_task(name, params, split, a.seconds, stride)
        sp = split + (f", stride {stride}" if stride > 1 else "")
        if r is None:
            print(f"| {name} | {params or 'defaults'} | {sp} | n/a ({err}) | | | |")
            continue
        print(f"| {name} | {params or 'defaults'} | {sp} | {r[0]:,.0f} | {r[1]:,.0f} | {r[2]:.0f} | {r[3]:,.0f} |")
    if not a.tasks or "mano" in a.tasks:
        r = bench_naive_mano(a.seconds)
        print(
            f"| naive recursive Mano (calibration) | L=10 | train | {r[0]:,.0f} | {r[1]:,.0f} | {r[2]:.0f} | "
            f"{r[3]:,.0f} |"
        )
    if a.pipeline:
        print()
        for tasks, pc in ((("depo1", "brevo1", "mano"), 1), (("mano",), 1), (("mano",), 8)):
            cpu, smp, wall = bench_pipeline(a.seconds, tasks, pc)
            print(
                f"pipeline {'+'.join(tasks)}, process {pc - 1} of {pc}, seq_len 4096, batch 1: {cpu:.1f} windows/s "
                f"(CPU) = {smp:,.0f} samples/s (CPU), {wall:.1f} windows/s (wall)"
            )


if __name__ == "__main__":
    main()
