"""Sweep planning (--print), result collection into a markdown table and heatmap PNGs (no training here: the runs'
metrics.jsonl files are written by the test)."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import yaml

from experiments import sweep as sw
from experiments.plot import draw_curves, draw_heatmaps, plot_curves

ROOT = pathlib.Path(__file__).parents[2]


@pytest.fixture()
def sweep_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "dir": str(tmp_path / "out"),
                "base": ["models/sizes/2L128.yaml"],
                "archs": {"rope": "models/llama_rope.yaml", "rope_canon": "models/llama_rope_canon_abcd.yaml"},
                "tasks": {"depo": "tasks/cpu_depo1.yaml", "mano": "tasks/cpu_mano.yaml"},
                "seeds": [0, 1],
                "overrides": ["train.steps=5", "optim.warmup_steps=1"],
            }
        )
    )
    return path


def test_print_writes_validated_run_files(sweep_file, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--config", str(sweep_file), "--print"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    cmds = r.stdout.strip().splitlines()
    assert len(cmds) == 2 * 2 * 2
    assert all("-m experiments.train --config" in c for c in cmds)
    from canon_jax.train.config import load_config

    cfg = load_config(tmp_path / "out" / "rope_canon" / "mano" / "seed1" / "run.yaml")
    assert (cfg.model.canon_set, cfg.model.num_layers, cfg.data.tasks[0].name) == ("ABCD", 2, "mano")
    assert (cfg.train.seed, cfg.data.seed, cfg.train.steps) == (1, 1, 5)
    assert not (tmp_path / "out" / "rope" / "depo" / "seed0" / "metrics.jsonl").exists()  # nothing ran


def test_bad_sweep_fails_fast(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({"archs": {"a": "models/llama_rope.yaml"}, "tasks": {"d": "tasks/cpu_depo1.yaml"}, "seedz": [1]})
    )
    r = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--config", str(path), "--print"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "unknown sweep keys ['seedz']" in r.stderr


def test_collect_table_and_heatmaps(sweep_file, tmp_path):
    sweep = sw.load_sweep(sweep_file)
    runs = sw.plan(sweep)
    truth = {}
    for run in runs:
        acc = {"rope": 0.2, "rope_canon": 0.8}[run["arch"]] + 0.1 * run["seed"]
        truth[(run["arch"], run["task"], run["seed"])] = acc
        run["workdir"].mkdir(parents=True)
        recs = [
            {"step": 5, "loss": 1.0, "lr": 0.1, "tokens_per_s": 1.0},
            {"step": 5, "eval": run["task"], f"{run['task']}/accuracy": acc - 0.5, "eval_seconds": 1.0},
            {
                "step": 5,
                "eval": run["task"],
                f"{run['task']}/accuracy": acc,
                f"{run['task']}/accuracy_k2": acc / 2,
                f"{run['task']}/count": 100,
                "eval_seconds": 1.0,
            },
        ]
        (run["workdir"] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = sw.collect(sweep, runs)
    assert res["depo"]["metrics"] == ["accuracy", "accuracy_k2"]  # "count" is not an accuracy metric
    np.testing.assert_allclose(res["depo"]["archs"]["rope_canon"]["accuracy"], [0.8, 0.9])
    md = sw.markdown(sweep, res)
    assert "| rope_canon | 2 | 0.850 ± 0.050 [0.80–0.90] | 0.425 ± 0.025 [0.40–0.45] |" in md
    pngs = draw_heatmaps(res, tmp_path / "out")
    assert [p.name for p in pngs] == ["depo.png", "mano.png"]
    curves = draw_curves(res, tmp_path / "out")  # per-k accuracy plots
    assert [p.relative_to(tmp_path / "out").as_posix() for p in curves] == ["curves/depo.png", "curves/mano.png"]
    for p in pngs + curves:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = plot_curves([runs[0]["workdir"], runs[1]["workdir"]], tmp_path / "c.png")
    assert curve.read_bytes()[:4] == b"\x89PNG"


def test_parallel_jobs_train_and_record_compute(tmp_path):
    """--jobs 2 trains two seeds at once (one pinned core each), records compute.json and collects the table."""
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "j",
                "dir": str(tmp_path / "out"),
                "base": ["models/sizes/2L128.yaml"],
                "archs": {"rope": "models/llama_rope.yaml"},
                "tasks": {"mano": "tasks/cpu_mano.yaml"},
                "seeds": [0, 1],
                "overrides": [
                    "train.steps=2",
                    "train.batch_size=2",
                    "data.seq_len=64",
                    "model.max_seq_len=64",
                    "optim.warmup_steps=1",
                    "eval.num_samples=4",
                    "eval.batch_size=4",
                    "checkpoint.every=2",
                    "logging.progress=false",
                    "logging.tensorboard=false",
                ],
            }
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--config", str(path), "--jobs", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for seed in (0, 1):
        wd = tmp_path / "out" / "rope" / "mano" / f"seed{seed}"
        comp = json.loads((wd / "compute.json").read_text())
        assert comp["tokens"] == 2 * 2 * 64 and comp["train_flops"] > 6 * comp["tokens"] * 1e5
        assert comp["wall_s"] > 0 and comp["cpu_s"] > 0 and comp["jobs"] == 2
        assert (wd / "train.log").read_text()  # each job's output goes to its own log
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(res["mano"]["archs"]["rope"]["accuracy"]) == 2
    assert len(res["mano"]["compute"]["rope"]["cpu_s"]) == 2
    assert "Compute per run" in (tmp_path / "out" / "results.md").read_text()
    # experiments.findings --run on that sweep: finished runs are not relaunched (their compute.json stays as it
    # was); one table and three PNGs
    before = [(tmp_path / "out" / "rope" / "mano" / f"seed{s}" / "compute.json").read_text() for s in (0, 1)]
    spec = tmp_path / "f.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "sweeps": {"s": str(path)},
                "comparisons": [{"title": "t", "task": "mano", "chance": 0.1, "rows": [["s", "rope", "RoPE"]]}],
            }
        )
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.findings",
            "--spec",
            str(spec),
            "--out",
            str(tmp_path / "res"),
            "--run",
            "--jobs",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("already finished") == 2
    assert before == [(tmp_path / "out" / "rope" / "mano" / f"seed{s}" / "compute.json").read_text() for s in (0, 1)]
    table = (tmp_path / "res" / "1_table.md").read_text()
    assert "| RoPE | 2 |" in table and "tokens / run" in table
    for name in ("1_final.png", "1_curve.png", "1_loss.png"):
        assert (tmp_path / "res" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jobs_must_be_positive(sweep_file):
    r = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--config", str(sweep_file), "--jobs", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "--jobs must be >= 1" in r.stderr
