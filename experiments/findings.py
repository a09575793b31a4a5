"""The paper's headline comparisons (issue 7) assembled from finished sweeps: one markdown table and two PNGs each.

    python -m experiments.findings [--spec configs/findings/cpu.yaml] [--out docs/results] [--run [--jobs N]]

``--run`` first trains every sweep the spec names (``experiments.sweep`` with ``--jobs N``; finished runs are
skipped, unfinished ones resume), so one command regenerates every number from scratch.

Spec YAML::

    sweeps: {depth: configs/sweeps/cpu_depth_depo.yaml, ...}   # label -> sweep file (their run directories are read)
    comparisons:
      - title: "1. Reasoning depth (Depo): RoPE / NoPE with and without Canon-ABCD"
        task: depo1
        rows: [[depth, rope, "Llama RoPE"], [depth, rope_canon_abcd, "RoPE + Canon-ABCD"], ...]

For each comparison: ``OUT/<n>_table.md`` (every evaluated accuracy and ``train_nll``, the answer-token loss on fresh
training samples averaged over the last three logged steps, as mean ± std [min–max] over seeds; the number of seeds,
tokens, training FLOPs and CPU seconds per run), ``OUT/<n>_final.png`` (the last evaluation: accuracy per k
for tasks with per-k metrics, else the overall accuracy, with every seed drawn as a dot) and ``OUT/<n>_curve.png``
(accuracy at every evaluation step, mean and min–max band) and ``OUT/<n>_loss.png`` (the training answer-token loss
against the step, same band). A row whose runs have not finished is reported as
missing, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import textwrap

import numpy as np
import yaml

from canon_jax.train.config import CONFIGS_ROOT
from canon_jax.train.metrics import read_metrics
from experiments import sweep as sw

SPEC_KEYS = {"sweeps", "comparisons"}
COMPARISON_KEYS = {"title", "task", "rows", "chance"}


def load_spec(path) -> dict:
    path = pathlib.Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; valid keys: {sorted(SPEC_KEYS)}")
    sweeps = {}
    for label, ref in (raw.get("sweeps") or {}).items():
        for cand in (path.parent / ref, CONFIGS_ROOT / ref, pathlib.Path(ref)):
            if cand.is_file():
                sweeps[label] = sw.load_sweep(cand)
                sweeps[label]["path"] = str(cand)
                break
        else:
            raise ValueError(f"{path}: sweep file {ref!r} of {label!r} not found")
    comps = raw.get("comparisons") or []
    if not comps:
        raise ValueError(f"{path}: 'comparisons' must be a non-empty list")
    for i, c in enumerate(comps):
        bad = sorted(set(c) - COMPARISON_KEYS)
        if bad or not {"title", "task", "rows"} <= set(c):
            raise ValueError(
                f"{path}: comparison {i} needs the keys title, task, rows (optional: chance), got {sorted(c)}"
            )
        for row in c["rows"]:
            if len(row) != 3 or row[0] not in sweeps:
                raise ValueError(
                    f"{path}: comparison {i}: row {row} must be [sweep label, arch, display name] with "
                    f"a sweep label among {sorted(sweeps)}"
                )
            if row[1] not in sweeps[row[0]]["archs"] or c["task"] not in sweeps[row[0]]["tasks"]:
                raise ValueError(
                    f"{path}: comparison {i}: sweep {row[0]!r} has no arch {row[1]!r} / task {c['task']!r}"
                )
    return {"sweeps": sweeps, "comparisons": comps}


def row_runs(sweep: dict, arch: str, task: str) -> list[dict]:
    return [r for r in sw.plan(sweep) if r["arch"] == arch and r["task"] == task]


def evals_by_step(workdir: pathlib.Path, task: str) -> dict[int, dict]:
    """``{step: {metric: value}}`` of the task's accuracy metrics at every evaluation of one run."""
    out: dict[int, dict] = {}
    for r in read_metrics(workdir / "metrics.jsonl"):
        if r.get("eval") == task:
            out[r["step"]] = {
                k.split("/", 1)[1]: float(v) for k, v in r.items() if k.startswith(task + "/") and "accuracy" in k
            }
    return out


def gather(spec: dict, comp: dict) -> list[dict]:
    """Per row: display name, per-seed final metrics, per-seed eval curves and compute records."""
    rows = []
    for label, arch, name in comp["rows"]:
        sweep = spec["sweeps"][label]
        runs = row_runs(sweep, arch, comp["task"])
        finals, curves, loss_curves, compute, missing = [], [], [], [], []
        for run in runs:
            ev = evals_by_step(run["workdir"], comp["task"])
            cfile = run["workdir"] / "compute.json"
            if not ev or not cfile.exists() or "train_flops" not in json.loads(cfile.read_text()):
                missing.append(run["seed"])
                continue
            final = dict(ev[max(ev)])
            losses = [
                r["nll"] for r in read_metrics(run["workdir"] / "metrics.jsonl") if "eval" not in r and "nll" in r
            ]
            if losses:  # answer-token loss on fresh training samples (infinite data: no overfitting), last 3 logs
                final["train_nll"] = float(np.mean(losses[-3:]))
            finals.append(final)
            curves.append(ev)
            loss_curves.append(
                {
                    r["step"]: r["nll"]
                    for r in read_metrics(run["workdir"] / "metrics.jsonl")
                    if "eval" not in r and "nll" in r
                }
            )
            compute.append(json.loads(cfile.read_text()))
        rows.append(
            {
                "name": name,
                "sweep": sweep["name"],
                "arch": arch,
                "seeds": [r["seed"] for r in runs],
                "missing": missing,
                "finals": finals,
                "curves": curves,
                "loss_curves": loss_curves,
                "compute": compute,
            }
        )
    return rows


def metric_names(rows, accuracy_only: bool = False) -> list[str]:
    names = []
    for r in rows:
        for f in r["finals"]:
            names += [m for m in f if m not in names and (not accuracy_only or m.startswith("accuracy"))]
    return sorted(names, key=lambda m: (m == "train_nll", sw._metric_order(m))) or ["accuracy"]


def table(comp: dict, rows: list[dict]) -> str:
    metrics = metric_names(rows)
    lines = [
        "| model | seeds | " + " | ".join(metrics) + " | tokens / run | train FLOPs / run | CPU s / run |",
        "|---|---|" + "---|" * len(metrics) + "---|---|---|",
    ]
    for r in rows:
        cells = [sw.fmt_cell([f[m] for f in r["finals"] if m in f]) for m in metrics]
        n = f"{len(r['finals'])}" + (f" (missing seeds {r['missing']})" if r["missing"] else "")
        comp_cells = ["-"] * 3
        if r["compute"]:
            c = r["compute"]
            comp_cells = [
                f"{np.mean([x['tokens'] for x in c]):,.0f}",
                f"{np.mean([x['train_flops'] for x in c]):.2e}",
                f"{np.mean([x['cpu_s'] for x in c]):.0f}",
            ]
        lines.append(f"| {r['name']} | {n} | " + " | ".join(cells) + " | " + " | ".join(comp_cells) + " |")
    return "\n".join(lines) + "\n"


def _chance(ax, comp: dict) -> None:
    if comp.get("chance") is not None:
        ax.axhline(float(comp["chance"]), color="gray", linestyle="--", linewidth=1, label="chance")


def plot_final(comp: dict, rows: list[dict], out: pathlib.Path) -> pathlib.Path:
    from experiments.plot import _plt

    plt = _plt()
    metrics = metric_names(rows, accuracy_only=True)
    ks = [m for m in metrics if m.startswith("accuracy_k")]
    shown = ks or ["accuracy"]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.8 + 1.3 * len(shown) * max(1, len(rows)) / 3), 4.2))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = np.arange(len(shown)) + (i - (len(rows) - 1) / 2) * width
        vals = [[f[m] for f in r["finals"] if m in f] for m in shown]
        means = [np.mean(v) if v else np.nan for v in vals]
        bars = ax.bar(xs, means, width * 0.9, label=f"{r['name']} (n={len(r['finals'])})")
        for x, v in zip(xs, vals):  # every seed as a dot
            ax.scatter([x] * len(v), v, s=10, color="black", zorder=3)
        del bars
    _chance(ax, comp)
    ax.set_xticks(np.arange(len(shown)), [m.replace("accuracy_k", "k = ") if ks else "accuracy" for m in shown])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("test accuracy (last evaluation)")
    ax.set_title("\n".join(textwrap.wrap(comp["title"], 90)), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_curve(comp: dict, rows: list[dict], out: pathlib.Path, loss: bool = False) -> pathlib.Path:
    """Test accuracy (or, with ``loss``, the training answer-token loss) against the step: mean, min–max band."""
    from experiments.plot import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        curves = r["loss_curves"] if loss else r["curves"]
        if not curves:
            continue
        steps = sorted(set.intersection(*[set(c) for c in curves]))
        vals = np.array([[c[s] if loss else c[s]["accuracy"] for s in steps] for c in curves])
        (line,) = ax.plot(steps, vals.mean(0), marker=None if loss else "o", label=f"{r['name']} (n={len(curves)})")
        ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
    if not loss:
        _chance(ax, comp)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss on answer tokens (fresh samples)" if loss else "test accuracy")
    if not loss:
        ax.set_ylim(-0.02, 1.02)
    ax.set_title("\n".join(textwrap.wrap(comp["title"], 90)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(CONFIGS_ROOT / "findings" / "cpu.yaml"))
    p.add_argument("--out", default="docs/results")
    p.add_argument("--run", action="store_true", help="train (or resume) every sweep of the spec first")
    p.add_argument("--jobs", type=int, default=1, help="with --run: trainings at once (experiments.sweep --jobs)")
    args = p.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except ValueError as e:
        print(f"findings: {e}", file=sys.stderr)
        return 2
    if args.run:
        for label, sweep in spec["sweeps"].items():
            print(f"== sweep {label}: {sweep['path']}", flush=True)
            if sw.main(["--config", sweep["path"], "--jobs", str(args.jobs)]) != 0:
                print(f"findings: sweep {label!r} had failed runs; rerun to resume them", file=sys.stderr)
                return 1
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    incomplete = False
    for i, comp in enumerate(spec["comparisons"], 1):
        rows = gather(spec, comp)
        incomplete |= any(r["missing"] for r in rows)
        md = f"### {comp['title']}\n\n" + table(comp, rows)
        (out / f"{i}_table.md").write_text(md)
        pngs = []
        if any(r["finals"] for r in rows):
            pngs = [
                plot_final(comp, rows, out / f"{i}_final.png"),
                plot_curve(comp, rows, out / f"{i}_curve.png"),
                plot_curve(comp, rows, out / f"{i}_loss.png", loss=True),
            ]
        print(md)
        print("plots:", ", ".join(str(x) for x in pngs) or "none (no finished runs)", "\n")
    if incomplete:
        print("some runs have not finished; their seeds are listed as missing", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
