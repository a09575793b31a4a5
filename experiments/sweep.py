"""Grid of architectures x tasks x seeds: run (or print for a cluster), then collect a markdown table and heatmaps.

    python -m experiments.sweep --config configs/sweeps/<file>.yaml [--print] [--collect-only] [--jobs N]
                                [--set k=v ...]

Sweep YAML::

    name: depo_canon
    dir: runs/sweeps/depo_canon          # sweep directory (relative to the current directory)
    base: [models/sizes/2L128.yaml]     # config files every run starts from (configs-root or sweep-file relative)
    archs:  {llama_rope: models/llama_rope.yaml, llama_rope_canon: models/llama_rope_canon_abcd.yaml}
    tasks:  {depo1: tasks/cpu_depo1.yaml}
    seeds:  [0, 1]
    overrides: [train.steps=300]        # applied to every run (then the command line's --set)
    metrics: ["accuracy"]               # substrings selecting the eval metrics shown (default: "accuracy")

Every run gets ``DIR/<arch>/<task>/seed<S>/run.yaml`` (``defaults:`` = base + arch + task, plus the overrides and
``train.seed``/``data.seed`` = S) and trains with ``python -m experiments.train --config run.yaml --workdir
<that dir>`` — re-running the sweep resumes unfinished runs and skips finished ones (``compute.json`` written and
the configured steps reached). ``--print`` writes the run files and prints one command per line (for a cluster
scheduler) without running anything. ``--jobs N`` runs N trainings at once, each pinned to
its own CPU core with single-threaded XLA (the way to fill a many-core CPU box with small playground runs; on an
accelerator host leave it at 1).

Each finished run gets ``compute.json``: wall and CPU seconds of the training process, tokens trained and the
estimated training FLOPs (``6·N·tokens`` plus attention, ``canon_jax.train.flops``). Results: ``DIR/results.md``
(mean ± std and min–max over seeds of each run's last evaluation, and the compute per cell), ``DIR/results.json``,
``DIR/heatmaps/<task>.png`` (architectures x metrics) and ``DIR/curves/<task>.png`` (per-k accuracy with the
min–max band over seeds, for tasks that report ``accuracy_k*``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import yaml

from canon_jax.train.config import CONFIGS_ROOT, ConfigError, load_config
from canon_jax.train.metrics import read_metrics
from experiments.plot import draw_curves, draw_heatmaps

SWEEP_KEYS = {"name", "dir", "base", "archs", "tasks", "seeds", "overrides", "metrics"}


def load_sweep(path) -> dict:
    path = pathlib.Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {unknown}; valid keys: {sorted(SWEEP_KEYS)}")
    for key in ("archs", "tasks"):
        if not isinstance(raw.get(key), dict) or not raw[key]:
            raise ConfigError(f"{path}: {key} must be a non-empty mapping label -> config file")
    raw.setdefault("name", path.stem)
    raw.setdefault("dir", f"runs/sweeps/{raw['name']}")
    raw.setdefault("base", [])
    raw.setdefault("seeds", [0])
    raw.setdefault("overrides", [])
    raw.setdefault("metrics", ["accuracy"])

    def resolve(ref):
        for cand in (path.parent / ref, CONFIGS_ROOT / ref):
            if cand.is_file():
                return str(cand.resolve())
        raise ConfigError(f"{path}: config file {ref!r} not found (looked in {path.parent} and {CONFIGS_ROOT})")

    raw["base"] = [resolve(r) for r in raw["base"]]
    raw["archs"] = {k: resolve(v) for k, v in raw["archs"].items()}
    raw["tasks"] = {k: resolve(v) for k, v in raw["tasks"].items()}
    return raw


def plan(sweep: dict, extra_overrides=()) -> list[dict]:
    """One entry per (arch, task, seed): its directory and run.yaml content; every config is validated here."""
    runs = []
    root = pathlib.Path(sweep["dir"]).absolute()
    for arch, arch_file in sweep["archs"].items():
        for task, task_file in sweep["tasks"].items():
            for seed in sweep["seeds"]:
                workdir = root / arch / task / f"seed{seed}"
                overrides = list(sweep["overrides"]) + [
                    f"train.seed={seed}",
                    f"data.seed={seed}",
                    f"name={sweep['name']}-{arch}-{task}-s{seed}",
                ]
                overrides += list(extra_overrides)
                raw = {"defaults": sweep["base"] + [arch_file, task_file]}
                runs.append(
                    {"arch": arch, "task": task, "seed": seed, "workdir": workdir, "raw": raw, "overrides": overrides}
                )
    return runs


def _write_run_file(run) -> pathlib.Path:
    """run.yaml = the composed defaults; the overrides are baked in as a nested mapping (validated first)."""
    run["workdir"].mkdir(parents=True, exist_ok=True)
    path = run["workdir"] / "run.yaml"
    nested: dict = {}
    for ov in run["overrides"]:
        key, value = ov.split("=", 1)
        cur = nested
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    path.write_text(yaml.safe_dump({**run["raw"], **nested}, sort_keys=False))
    run["steps"] = load_config(path).train.steps  # fail fast, before anything runs
    return path


def finished(run) -> bool:
    """Whether the run completed: its ``compute.json`` exists (written after a successful exit) and its metrics reach
    the configured number of steps (a run whose ``train.steps`` was raised since is not finished)."""
    if not (run["workdir"] / "compute.json").exists() or "steps" not in run:
        return False
    steps = [r["step"] for r in read_metrics(run["workdir"] / "metrics.jsonl") if "eval" not in r]
    return bool(steps) and max(steps) >= run["steps"]


def command(run) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "--config",
        str(run["workdir"] / "run.yaml"),
        "--workdir",
        str(run["workdir"]),
    ]


def _run_flops(workdir: pathlib.Path) -> tuple[int, float]:
    """(tokens trained, estimated training FLOPs) of the run described by ``workdir/run.yaml``."""
    import jax
    import jax.numpy as jnp

    from canon_jax.models import CausalLM
    from canon_jax.train.config import model_config
    from canon_jax.train.flops import count_params, flops_per_token

    cfg = load_config(workdir / "run.yaml")
    mc = model_config(cfg)
    shapes = jax.eval_shape(CausalLM(mc).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    return tokens, tokens * flops_per_token(mc, count_params(shapes["params"]), cfg.data.seq_len)


def _pin(core: int | None):
    if core is None or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, {core})


def run_all(runs: list[dict], jobs: int = 1) -> list[dict]:
    """Trains every run (``jobs`` at a time); writes ``compute.json`` per finished run; returns the failed runs."""
    env = dict(os.environ)
    cores = None
    if jobs > 1:
        # one core and one XLA thread per training process: no oversubscription, no cross-run interference
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()
        avail = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(jobs))
        cores = [avail[i % len(avail)] for i in range(jobs)]
    pending = []
    for i, run in enumerate(runs, 1):
        if finished(run):  # not relaunched: its compute.json keeps the time it really took
            print(f"[{i}/{len(runs)}] {run['arch']} / {run['task']} / seed {run['seed']}: already finished", flush=True)
        else:
            pending.append((i, run))
    active: dict[int, tuple] = {}  # pid -> (run, slot, start time)
    free = list(range(jobs))
    failed = []
    while pending or active:
        while pending and free:
            i, run = pending.pop(0)
            slot = free.pop(0)
            print(f"[{i}/{len(runs)}] {run['arch']} / {run['task']} / seed {run['seed']}", flush=True)
            log = open(run["workdir"] / "train.log", "a") if jobs > 1 else None
            proc = subprocess.Popen(
                command(run),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                preexec_fn=_pin(cores[slot] if cores else None),
            )
            if log:
                log.close()
            active[proc.pid] = (run, slot, time.perf_counter())
        pid, status, usage = os.wait4(-1, 0)
        if pid not in active:
            continue
        run, slot, t0 = active.pop(pid)
        free.append(slot)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(run)
            print(f"  failed: {run['arch']} / {run['task']} / seed {run['seed']} (see {run['workdir']})", flush=True)
            continue
        # (FLOPs are added by collect(): initialising JAX here would make every later fork unsafe)
        compute = {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "jobs": jobs}
        prev = run["workdir"] / "compute.json"
        if prev.exists():  # a resumed run: add the earlier attempts' time
            old = json.loads(prev.read_text())
            compute["wall_s"] = round(compute["wall_s"] + old.get("wall_s", 0.0), 1)
            compute["cpu_s"] = round(compute["cpu_s"] + old.get("cpu_s", 0.0), 1)
        prev.write_text(json.dumps(compute, indent=2))
    return failed


def _last_eval(workdir: pathlib.Path) -> dict:
    out = {}
    for r in read_metrics(workdir / "metrics.jsonl"):
        if "eval" in r:
            out.update({k: v for k, v in r.items() if k not in ("step", "eval", "eval_seconds")})
            out["_step"] = r["step"]
    return out


def collect(sweep: dict, runs: list[dict]) -> dict:
    """``{task: {"metrics": [...], "archs": {arch: {metric: [value per seed]}}}}`` from the runs' last evaluations."""
    keep = sweep["metrics"]
    res: dict = {}
    for run in runs:
        ev = _last_eval(run["workdir"])
        t = res.setdefault(run["task"], {"metrics": [], "archs": {}, "compute": {}})
        row = t["archs"].setdefault(run["arch"], {})
        comp = run["workdir"] / "compute.json"
        if comp.exists():
            c = json.loads(comp.read_text())
            if "train_flops" not in c:
                c["tokens"], c["train_flops"] = _run_flops(run["workdir"])
                comp.write_text(json.dumps(c, indent=2))
            cell = t["compute"].setdefault(run["arch"], {"wall_s": [], "cpu_s": [], "tokens": [], "train_flops": []})
            for k in cell:
                cell[k].append(float(c[k]))
        for k, v in ev.items():
            if k.startswith("_") or not isinstance(v, (int, float)) or not any(s in k for s in keep):
                continue
            name = k.split("/", 1)[-1]
            if name not in t["metrics"]:
                t["metrics"].append(name)
            row.setdefault(name, []).append(float(v))
    for t in res.values():
        t["metrics"].sort(key=_metric_order)
    return res


def _metric_order(name: str):
    # "accuracy" first, then per-k / per-attribute entries in numeric order (accuracy_k2 before accuracy_k16)
    digits = "".join(ch for ch in name if ch.isdigit())
    return (name != "accuracy", name.rstrip("0123456789"), int(digits) if digits else -1)


def fmt_cell(vals) -> str:
    """``mean ± std [min–max] (n)`` of one cell's per-seed values."""
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f} (n=1)"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f} [{min(vals):.2f}–{max(vals):.2f}]"


def markdown(sweep: dict, res: dict) -> str:
    lines = [
        f"# Sweep {sweep['name']}",
        "",
        "Each cell: mean ± std [min–max] over seeds of the run's last evaluation.",
        "",
    ]
    for task, t in res.items():
        lines += [
            f"## {task}",
            "",
            "| arch | seeds | " + " | ".join(t["metrics"]) + " |",
            "|---|---|" + "---|" * len(t["metrics"]),
        ]
        for arch, row in t["archs"].items():
            n = max((len(v) for v in row.values()), default=0)
            lines.append(f"| {arch} | {n} | " + " | ".join(fmt_cell(row.get(m, [])) for m in t["metrics"]) + " |")
        if t.get("compute"):
            lines += [
                "",
                "Compute per run (mean over seeds):",
                "",
                "| arch | tokens | train FLOPs | wall s | CPU s |",
                "|---|---|---|---|---|",
            ]
            for arch, c in t["compute"].items():
                lines.append(
                    f"| {arch} | {np.mean(c['tokens']):,.0f} | {np.mean(c['train_flops']):.3g} | "
                    f"{np.mean(c['wall_s']):.0f} | {np.mean(c['cpu_s']):.0f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--print", dest="print_only", action="store_true", help="write run files, print commands, exit")
    p.add_argument("--collect-only", action="store_true", help="only rebuild results.md / heatmaps")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (each pinned to one core when > 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        sweep = load_sweep(args.config)
        runs = plan(sweep, args.overrides)
        for run in runs:
            _write_run_file(run)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_only:
        for run in runs:
            print(" ".join(command(run)))
        return 0
    failed = []
    if not args.collect_only:
        failed = run_all(runs, args.jobs)
    root = pathlib.Path(sweep["dir"])
    res = collect(sweep, runs)
    (root / "results.json").write_text(json.dumps(res, indent=2))
    (root / "results.md").write_text(markdown(sweep, res))
    pngs = draw_heatmaps(res, root) + draw_curves(res, root)
    print((root / "results.md").read_text())
    print("plots:", ", ".join(str(x) for x in pngs))
    if failed:
        print(
            f"{len(failed)} run(s) failed: " + ", ".join(f"{r['arch']}/{r['task']}/seed{r['seed']}" for r in failed),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
