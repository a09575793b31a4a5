"""Plots from run directories: training / evaluation curves and paper-style heatmaps (matplotlib PNG).

    canon-plot curves RUN_DIR [RUN_DIR ...] --out curves.png [--metric loss] [--metric 'depo1/accuracy_k*' ...]
    canon-plot heatmap SWEEP_DIR            # re-draw a sweep's heatmaps from its results.json

(``python -m experiments.plot ...`` is the same.) ``--metric`` names a training metric (``loss``, ``lr``,
``grad_norm``, ``tokens_per_s`` ...) or an evaluation metric (``depo1/accuracy``, ``depo1/accuracy_k2``,
``eval_loss`` ...); shell-style patterns select several (``'depo1/accuracy_k*'``: one line per k). A run directory
without ``metrics.jsonl`` or a metric no run has is an error (exit 2, the message lists the metrics there are).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import pathlib
import sys

import numpy as np

from canon_jax.train.metrics import read_metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class PlotError(ValueError):
    """A run directory or metric that is not there; the message says which and what there is."""


def curve_data(run_dirs, metrics) -> dict:
    """``{(run name, metric): (steps, values)}`` for every metric (or pattern) in ``metrics`` and every run."""
    out = {}
    for d in run_dirs:
        path = pathlib.Path(d) / "metrics.jsonl"
        if not path.is_file():
            raise PlotError(f"{d}: no metrics.jsonl (not a run directory, or the run has not logged yet)")
        recs = read_metrics(path)
        names = sorted(
            {
                k
                for r in recs
                for k, v in r.items()
                if k not in ("step", "eval") and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        for pattern in metrics:
            chosen = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not chosen:
                raise PlotError(f"{d}: no metric {pattern!r}; metrics there: {', '.join(names) or 'none'}")
            for name in chosen:
                pts = sorted((r["step"], float(r[name])) for r in recs if isinstance(r.get(name), (int, float)))
                out[(pathlib.Path(d).name, name)] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def plot_curves(run_dirs, out, metric="loss") -> pathlib.Path:
    """``metric`` (a name, a pattern, or a list of them) against step for each run: training records and evaluation
    records alike (evaluations are drawn with markers). Raises :class:`PlotError` on a missing run or metric."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    data = curve_data(run_dirs, metrics)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    several = len({name for _, name in data}) > 1
    for (run, name), (steps, values) in data.items():
        label = f"{run}: {name}" if several else run
        ax.plot(steps, values, marker="o" if ("/" in name or name.startswith("eval")) else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metrics[0] if len(metrics) == 1 else "value")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_per_k(ks, series: dict, title: str, out) -> pathlib.Path:
    """Accuracy against hop count ``k``: ``series[label]`` is a list (one entry per k) of per-seed values; draws the
    mean with markers and the min–max band over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, per_k in series.items():
        mean = np.array([np.mean(v) if len(v) else np.nan for v in per_k])
        lo = np.array([np.min(v) if len(v) else np.nan for v in per_k])
        hi = np.array([np.max(v) if len(v) else np.nan for v in per_k])
        n = max((len(v) for v in per_k), default=0)
        (line,) = ax.plot(ks, mean, marker="o", label=f"{label} (n={n})")
        ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (hops)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_heatmap(values: np.ndarray, rows, cols, title: str, out, vmin=0.0, vmax=1.0) -> pathlib.Path:
    """Paper-style heatmap: ``values[i, j]`` (NaN = missing) for row labels ``rows`` and column labels ``cols``,
    each cell annotated with its value (in percent when the scale is [0, 1])."""
    plt = _plt()
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.45 * len(rows)))
    im = ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    pct = vmin == 0.0 and vmax == 1.0
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = values[i, j]
            text = "-" if not np.isfinite(v) else (f"{100 * v:.0f}" if pct else f"{v:.3g}")
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def draw_curves(res: dict, root: pathlib.Path) -> list[pathlib.Path]:
    """Per-k accuracy of a sweep's collected results (mean line, min–max band over seeds) for every task reporting
    ``accuracy_k*``."""
    out = []
    for task, t in res.items():
        ks = [m for m in t["metrics"] if m.startswith("accuracy_k")]
        if not ks:
            continue
        series = {arch: [row.get(m, []) for m in ks] for arch, row in t["archs"].items()}
        out.append(
            plot_per_k(
                [int(m[len("accuracy_k") :]) for m in ks],
                series,
                f"{task}: accuracy per k",
                root / "curves" / f"{task}.png",
            )
        )
    return out


def draw_heatmaps(res: dict, root: pathlib.Path) -> list[pathlib.Path]:
    """Per task, a heatmap of every architecture x metric (mean over seeds) of a sweep's collected results."""
    out = []
    for task, t in res.items():
        if not t["metrics"]:
            continue
        archs = list(t["archs"])
        vals = np.array(
            [[np.mean(t["archs"][a][m]) if t["archs"][a].get(m) else np.nan for m in t["metrics"]] for a in archs]
        )
        out.append(
            plot_heatmap(vals, archs, t["metrics"], f"{task} (mean over seeds)", root / "heatmaps" / f"{task}.png")
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curves")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", required=True)
    c.add_argument(
        "--metric",
        action="append",
        default=None,
        help="metric name or pattern, training or evaluation (repeatable; default: loss)",
    )
    h = sub.add_parser("heatmap")
    h.add_argument("sweep_dir")
    args = p.parse_args(argv)
    if args.cmd == "curves":
        try:
            print(plot_curves(args.runs, args.out, args.metric or ["loss"]))
        except PlotError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        results = pathlib.Path(args.sweep_dir) / "results.json"
        if not results.is_file():
            print(f"error: {args.sweep_dir}: no results.json (run or collect the sweep first)", file=sys.stderr)
            return 2
        res = json.loads(results.read_text())
        for path in draw_heatmaps(res, pathlib.Path(args.sweep_dir)):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
