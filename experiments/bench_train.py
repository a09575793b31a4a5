"""Training-step throughput: tokens/s (and MFU on a known accelerator) of the trainer's jitted step.

    python -m experiments.bench_train [--config configs/quickstart.yaml] [--steps 20] [--warmup 2] [--set k=v ...]
    python -m experiments.bench_train --config configs/experiments/llama_canon_1b_bench.yaml   # one GPU, bf16

The step is the full trainer step (forward, backward, clipping, AdamW, sharded as configured). Batches are random
token windows of the configured shape (``--real-data`` reads the config's data pipeline instead), so the number
measures the model step, not data generation. Timing: ``--warmup`` steps (compilation) are excluded; then the median
of ``--repeats`` timings of ``--steps`` steps each, ending with ``block_until_ready``. Also reported: CPU-seconds of
the process per step (``time.process_time``), which is what matters on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

from canon_jax import runtime
from canon_jax.train.config import load_config
from canon_jax.train.flops import flops_per_token, peak_flops_per_device
from canon_jax.train.trainer import Trainer, make_train_data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--real-data", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    runtime.print_hint(jax.default_backend())
    cfg = load_config(args.config, args.overrides)
    tr = Trainer(cfg)
    B, L = cfg.train.batch_size, cfg.data.seq_len
    if args.real_data:
        it = iter(make_train_data(cfg, split="train", batch_size=B, process_index=0, process_count=1))
        batches = [next(it) for _ in range(4)]
    else:
        rng = np.random.default_rng(0)
        batches = []
        for _ in range(4):
            toks = rng.integers(1, cfg.model.vocab_size, size=(B, L + 1), dtype=np.int32)
            batches.append(
                {
                    "inputs": toks[:, :-1],
                    "targets": toks[:, 1:],
                    "loss_mask": np.ones((B, L), np.float32),
                    "segment_ids": np.ones((B, L), np.int32),
                    "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
                }
            )
    batches = [tr.global_batch(b) for b in batches]
    state = tr.init_state()
    t0 = time.perf_counter()
    for i in range(args.warmup):
        state, m = tr.step(state, batches[i % 4])
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    times, cpu_times = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(args.steps):
            state, m = tr.step(state, batches[i % 4])
        jax.block_until_ready(m["loss"])
        times.append((time.perf_counter() - t0) / args.steps)
        cpu_times.append((time.process_time() - c0) / args.steps)
    step_s = statistics.median(times)
    cpu_s = statistics.median(cpu_times)
    tps = B * L / step_s
    fpt = flops_per_token(tr.model_config, tr.n_params, L)
    peak = cfg.train.peak_flops_per_device or peak_flops_per_device()
    out = {
        "config": args.config,
        "overrides": args.overrides,
        "params": tr.n_params,
        "batch": B,
        "seq_len": L,
        "dtype": cfg.model.dtype,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "mesh": dict(tr.mesh.shape),
        "ms_per_step": 1000 * step_s,
        "tokens_per_s": tps,
        "step_times_ms": [1000 * t for t in times],
        # CPU-seconds of this process (all threads) per step: on a shared machine, tokens per CPU-second times the
        # number of cores bounds what a quiet machine would reach.
        "cpu_s_per_step": cpu_s,
        "tokens_per_cpu_s": B * L / cpu_s,
        "warmup_s": compile_s,
        "flops_per_token": fpt,
        "mfu": tps * fpt / (jax.device_count() * peak) if peak else None,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "malloc_hugepages": runtime.malloc_hugepages_active(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "final_loss": float(m["loss"]),
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
