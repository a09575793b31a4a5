"""Plots from run directories: training curves and paper-style heatmaps (matplotlib PNG).

    python -m experiments.plot curves RUN_DIR [RUN_DIR ...] --out curves.png [--metric loss]
    python -m experiments.plot heatmap SWEEP_DIR            # re-draw a sweep's heatmaps from its results.json
"""
from __future__ import annotations

import argparse
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


def plot_curves(run_dirs, out, metric: str = "loss") -> pathlib.Path:
    """Training ``metric`` against step for each run (one line per run directory)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d in run_dirs:
        recs = [r for r in read_metrics(pathlib.Path(d) / "metrics.jsonl") if metric in r and "eval" not in r]
        if recs:
            ax.plot([r["step"] for r in recs], [r[metric] for r in recs], label=pathlib.Path(d).name)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curves")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", required=True)
    c.add_argument("--metric", default="loss")
    h = sub.add_parser("heatmap")
    h.add_argument("sweep_dir")
    args = p.parse_args(argv)
    if args.cmd == "curves":
        print(plot_curves(args.runs, args.out, args.metric))
    else:
        from experiments.sweep import draw_heatmaps

        res = json.loads((pathlib.Path(args.sweep_dir) / "results.json").read_text())
        for path in draw_heatmaps(res, pathlib.Path(args.sweep_dir)):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
