"""A run never loses work: resume integrity, damaged checkpoints, one-line config errors, Ctrl-C, the workdir lock,
and the ways to look at a run (plot, export, load_run). Tiny configs; the signal test runs a real subprocess."""

import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from canon_jax.train.checkpoint import Checkpointer, CheckpointMismatch
from canon_jax.train.config import config_from_dict, config_to_dict
from canon_jax.train.metrics import read_metrics
from canon_jax.train.trainer import Trainer, train
from canon_jax.train.workdir import LOCK_NAME, WorkdirLock, config_changes
from experiments import train as train_cli
from tests.train._util import tiny_config, write_corpus

ROOT = pathlib.Path(__file__).parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _tree_hashes(root: pathlib.Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _corrupt_arrays(step_dir: pathlib.Path):
    """Storage damage that leaves the metadata readable: every array chunk file overwritten with junk."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(b"\x00junk")


def _own_lines(err: str) -> list:
    """stderr lines without the C++ logging preamble that the jax CUDA plugin prints when the backend starts on a
    machine without a GPU (environment noise, not canon-jax's output)."""
    return [
        ln
        for ln in err.splitlines()
        if not (
            ln.startswith("WARNING: All log messages before absl::InitializeLog()")
            or re.match(r"^[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] ", ln)
        )
    ]


def _write_cfg(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return str(path)


# ----------------------------------------------------------------------------------------------------------------------
def test_changed_model_refused_allowed_changes_printed(corpus, tmp_path, capfd):
    raw = tiny_config(corpus, train={"steps": 4, "stop_after": 2, "log_every": 1})
    cfg_path = _write_cfg(tmp_path / "cfg.yaml", raw)
    wd = tmp_path / "run"
    assert train_cli.main(["--config", cfg_path, "--workdir", str(wd)]) == 0
    before = _tree_hashes(wd)
    assert "checkpoints/2/state/_METADATA" in before and "metrics.jsonl" in before
    capfd.readouterr()

    for change in ("model.hidden_size=64", "model.canon_set=AC", "data.seq_len=32", "optim.grad_clip=0"):
        assert train_cli.main(["--config", cfg_path, "--workdir", str(wd), "--set", change]) == 2
        err = _own_lines(capfd.readouterr().err)
        key = change.split("=")[0]
        assert len(err) == 1 and err[0].startswith(f"config error: {key}: the run in {wd} was trained with "), err
        assert "new --workdir" in err[0]
        assert _tree_hashes(wd) == before  # every old file byte-identical, nothing added
        assert not (wd / LOCK_NAME).exists()

    # --new-workdir picks the first sibling that is free or holds the changed config's own run
    big = config_from_dict(raw, ["model.hidden_size=64"])
    assert train_cli._compatible_workdir(str(wd), big) == f"{wd}-1"
    assert f"training in {wd}-1 instead ({wd} is left untouched)" in capfd.readouterr().out
    (tmp_path / "run-1").mkdir()
    (tmp_path / "run-1" / "config.json").write_text(json.dumps(config_to_dict(config_from_dict(raw))))
    assert train_cli._compatible_workdir(str(wd), big) == f"{wd}-2"  # run-1 holds another config: skipped
    (tmp_path / "run-1" / "config.json").write_text(json.dumps(config_to_dict(big)))
    assert train_cli._compatible_workdir(str(wd), big) == f"{wd}-1"  # ... and is resumed once it is big's run

    # optimizer / schedule changes continue the run and are printed
    assert (
        train_cli.main(
            ["--config", cfg_path, "--workdir", str(wd), "--set", "optim.lr=0.005", "--set", "train.stop_after=3"]
        )
        == 0
    )
    out = capfd.readouterr().out
    assert "resuming with changed settings: optim.lr: 0.01 -> 0.005, train.stop_after: 2 -> 3" in out
    assert "resumed from checkpoint at step 2" in out
    assert [r["step"] for r in read_metrics(wd / "metrics.jsonl") if "loss" in r] == [1, 2, 3]

    # a checkpoint whose tree does not fit is a mismatch (a config error), never "damage": nothing is moved
    ck = Checkpointer(wd / "checkpoints", 2, 5)
    with pytest.raises(
        CheckpointMismatch,
        match=r"step 3 .* does not fit this config \(.*: checkpoint \(.*\) float32, this config \(.*64.*\) float32",
    ):
        ck.restore(Trainer(big).restore_target())
    ck.close()
    assert not (wd / "damaged_checkpoints").exists()


def test_config_changes_classification():
    old = {
        "model": {"hidden_size": 32, "dtype": "float32"},
        "data": {"seq_len": 64, "num_workers": 0},
        "optim": {"lr": 0.01, "grad_clip": 1.0, "weight_decay": 0.1},
        "train": {"steps": 8, "seed": 0},
    }
    new = {
        "model": {"hidden_size": 32, "dtype": "bfloat16"},
        "data": {"seq_len": 64, "num_workers": 2},
        "optim": {"lr": 0.02, "grad_clip": 0.5, "weight_decay": 0.0},
        "train": {"steps": 10, "seed": 0},
    }
    refused, allowed = config_changes(old, new)
    assert [c[0] for c in refused] == ["optim.weight_decay"]  # switching decay off changes the optimizer state
    assert [c[0] for c in allowed] == ["data.num_workers", "model.dtype", "optim.grad_clip", "optim.lr", "train.steps"]


def test_damaged_newest_checkpoint_fallback_resave_and_finished_rerun(corpus, tmp_path, capfd):
    raw = tiny_config(
        corpus, train={"steps": 6}, checkpoint={"every": 2, "async_save": False}, eval={"at_end": True, "every": 2}
    )
    full = train(config_from_dict(raw), tmp_path / "a")
    capfd.readouterr()

    wb = tmp_path / "b"
    train(config_from_dict(raw, ["train.stop_after=4"]), wb)
    assert sorted(int(p.name) for p in (wb / "checkpoints").iterdir()) == [2, 4]
    out = capfd.readouterr().out
    assert "evaluation at step 2: held-out loss" in out  # every evaluation reaches the terminal
    _corrupt_arrays(wb / "checkpoints" / "4")
    damaged_files = _tree_hashes(wb / "checkpoints" / "4")

    resumed = train(config_from_dict(raw), wb)
    out = capfd.readouterr().out
    lines = [ln for ln in out.splitlines() if "damaged" in ln]
    assert len(lines) == 1 and re.match(
        r"damaged checkpoint\(s\) at step\(s\) 4 \(.+\) moved to .*damaged_checkpoints; "
        r"resuming from step 2$",
        lines[0],
    ), out
    assert resumed["start_step"] == 2 and resumed["step"] == 6
    # moved aside byte for byte, and step 4 saved again when training passed it
    assert _tree_hashes(wb / "damaged_checkpoints" / "4") == damaged_files
    assert Checkpointer(wb / "checkpoints", 2, 5).all_steps() == [2, 4, 6]
    chex.assert_trees_all_close(
        jax.device_get(resumed["state"]["params"]), jax.device_get(full["state"]["params"]), atol=1e-6, rtol=0
    )
    la = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in r}
    lb = {r["step"]: r["loss"] for r in read_metrics(wb / "metrics.jsonl") if "loss" in r}
    assert sorted(lb) == list(range(1, 7))
    np.testing.assert_allclose([lb[s] for s in range(1, 7)], [la[s] for s in range(1, 7)], atol=1e-6, rtol=0)
    re_saved = Checkpointer(wb / "checkpoints", 2, 5)
    assert re_saved.restore(Trainer(config_from_dict(raw)).restore_target())[0] == 6 and not re_saved.damaged
    re_saved.close()

    # the finished run re-run: its final loss and recorded evaluation, no second evaluation appended
    n_eval = sum("eval" in r for r in read_metrics(wb / "metrics.jsonl"))
    again = train(config_from_dict(raw), wb)
    out = capfd.readouterr().out
    assert "already at step 6 of 6, nothing to train" in out and "evaluation at step 6 (recorded)" in out
    assert again["loss"] == pytest.approx(lb[6]) and again["eval"]["text"]["step"] == 6
    assert sum("eval" in r for r in read_metrics(wb / "metrics.jsonl")) == n_eval


def test_all_checkpoints_damaged_is_an_announced_fresh_start(corpus, tmp_path, capfd):
    raw = tiny_config(corpus, train={"steps": 4, "stop_after": 4}, checkpoint={"every": 2, "async_save": False})
    wd = tmp_path / "run"
    train(config_from_dict(raw), wd)
    _corrupt_arrays(wd / "checkpoints" / "4")
    (wd / "checkpoints" / "2" / "state" / "_METADATA").write_text("{broken")  # unreadable metadata: damage too
    capfd.readouterr()
    summary = train(config_from_dict(raw), wd)
    out = capfd.readouterr().out
    assert re.search(
        r"^No usable checkpoint: starting from step 0 \(damaged checkpoint\(s\) at step\(s\) 4, 2 ", out, re.M
    ), out
    assert summary["start_step"] == 0 and summary["step"] == 4
    assert sorted(p.name for p in (wd / "damaged_checkpoints").iterdir()) == ["2", "4", "metrics.jsonl"]
    assert Checkpointer(wd / "checkpoints", 2, 5).all_steps() == [2, 4]


# ----------------------------------------------------------------------------------------------------------------------
def _synthetic(**sections):
    raw = {
        "name": "bad",
        "model": {
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "vocab_size": 64,
            "max_seq_len": 64,
            "multiple_of": 32,
        },
        "data": {
            "kind": "synthetic",
            "seq_len": 64,
            "tasks": [{"name": "depo1", "params": {"N": 6, "K": 2, "mini_vocab": 8, "min_len": 1, "max_len": 1}}],
        },
        "train": {"steps": 4, "batch_size": 4},
        "logging": {"progress": False, "tensorboard": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


# (description, raw config or None for the base, extra arguments, expected start of the message after "config error: ")
MALFORMED = [
    ("unknown section", {**_synthetic(), "optimizer": {"lr": 1}}, [], "optimizer: unknown key"),
    ("misspelt key", _synthetic(optim={"lrr": 0.1}), [], "optim.lrr: unknown key (did you mean 'lr'?)"),
    ("not a number", _synthetic(optim={"lr": "abc"}), [], "optim.lr: Value 'abc'"),
    ("negative lr", _synthetic(optim={"lr": -1.0}), [], "optim.lr: must be > 0"),
    ("bad choice", _synthetic(optim={"z_loss": "foo"}), [], "optim.z_loss: 'foo' is not a valid choice"),
    ("heads do not divide", None, ["--set", "model.num_heads=3"], "model.num_heads:"),
    ("vocab too small", None, ["--set", "model.vocab_size=10"], "model.vocab_size: 10 is smaller"),
    (
        "unknown task parameter",
        None,
        ["--set", "data.tasks=[{name: depo1, params: {hops: 3}}]"],
        "data.tasks[0].params: unknown parameter(s) ['hops']",
    ),
    (
        "impossible task parameter",
        None,
        ["--set", "data.tasks=[{name: depo1, params: {N: -5}}]"],
        "data.tasks[0].params: depo1: N must be >= 3",
    ),
    (
        "mistyped task parameter",
        None,
        ["--set", "data.tasks=[{name: mano, params: {L: ten}}]"],
        "data.tasks[0].params: task 'mano': parameter 'L' expects int",
    ),
    ("unknown task", None, ["--set", "data.tasks=[{name: depo3}]"], "data.tasks[0].name: unknown task 'depo3'"),
    ("bad evaluation task", None, ["--set", "eval.tasks=[{name: brevo1, params: {N: 1}}]"], "eval.tasks[0].params:"),
    (
        "window shorter than a sample",
        None,
        ["--set", "data.seq_len=16"],
        "data.seq_len: 16 is shorter than a depo1 sample",
    ),
    ("zero batch", None, ["--set", "train.batch_size=0"], "train.batch_size: must be > 0"),
    ("accumulation does not divide", None, ["--set", "train.grad_accum=3"], "train.grad_accum: 3 does not divide"),
    ("stop after the end", None, ["--set", "train.stop_after=100"], "train.stop_after: must be in [1, train.steps=4]"),
    ("warmup past the end", None, ["--set", "optim.warmup_steps=10"], "optim.warmup_steps: 10 exceeds train.steps 4"),
    ("zero checkpoint interval", None, ["--set", "checkpoint.every=0"], "checkpoint.every: must be > 0"),
    ("override without value", None, ["--set", "optim.lr"], "override 'optim.lr': expected key.sub=value"),
    ("text run without files", _synthetic(data={"kind": "text", "tasks": []}), [], "data.text.train_files:"),
    ("workdir is a file", None, ["--workdir", "{file}"], "--workdir: {file} exists and is not a directory"),
    (
        "workdir under a file",
        None,
        ["--workdir", "{file}/run"],
        "--workdir: {file}/run cannot be created: {file} is a file",
    ),
    ("missing config file", "missing", [], "--config: file not found"),
    ("invalid YAML", "invalid", [], "{cfg}: invalid YAML"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_config_one_line_exit_2_nothing_written(case, tmp_path, capfd):
    desc, raw, extra, expected = case
    cfg = tmp_path / "cfg.yaml"
    if raw == "invalid":
        cfg.write_text("model: {hidden_size: 32\n")
    elif raw != "missing":
        cfg.write_text(yaml.safe_dump(raw if raw is not None else _synthetic()))
    afile = tmp_path / "a_file"
    afile.write_text("not a directory")
    subst = {"{file}": str(afile), "{cfg}": str(cfg)}
    args = ["--config", str(cfg)] + [functools_reduce(a, subst) for a in extra]
    if "--workdir" not in args:
        args += ["--workdir", str(tmp_path / "run")]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    capfd.readouterr()
    assert train_cli.main(args) == 2
    out, err = capfd.readouterr()
    lines = _own_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("config error: " + functools_reduce(expected, subst)), lines[0]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written
    assert afile.read_text() == "not a directory"


def functools_reduce(text: str, subst: dict) -> str:
    for k, v in subst.items():
        text = text.replace(k, v)
    return text


# ----------------------------------------------------------------------------------------------------------------------
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return env


def _logged_steps(workdir):
    return [r["step"] for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl") if "loss" in r]


def test_ctrl_c_saves_and_lock_refuses_a_second_run(corpus, tmp_path, capfd):
    raw = tiny_config(corpus, train={"steps": 5000, "log_every": 1}, checkpoint={"every": 10000})
    cfg_path = _write_cfg(tmp_path / "cfg.yaml", raw)
    wd = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "--config", cfg_path, "--workdir", str(wd)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        t0 = time.time()
        while len(_logged_steps(wd)) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() - t0 < 300, "no training step within 300 s"
            time.sleep(0.05)
        owner = json.loads((wd / LOCK_NAME).read_text())
        assert owner["pid"] == proc.pid and owner["host"]

        # a second run on the same workdir is refused while the first lives
        capfd.readouterr()
        assert train_cli.main(["--config", cfg_path, "--workdir", str(wd)]) == 2
        err = _own_lines(capfd.readouterr().err)
        assert len(err) == 1 and err[0].startswith(f"error: workdir {wd} is in use by PID {proc.pid} on this host")

        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    last = max(_logged_steps(wd))
    assert last < 5000
    assert Checkpointer(wd / "checkpoints", 10000, 5).all_steps() == [last]  # saved at the current step
    assert not (wd / LOCK_NAME).exists()
    assert f"SIGINT: saved a checkpoint at step {last}, exiting" in out and "Traceback" not in err
    assert _own_lines(err) == [
        "Ctrl-C: a checkpoint will be saved after the current step (Ctrl-C again aborts without saving)"
    ]
    # a pipe gets one plain line per logged step, no carriage-return frames
    assert "\r" not in out and re.search(r"^step 2/5000  loss \d+\.\d{4}", out, re.M), out[:2000]


def test_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    lock = WorkdirLock(tmp_path)
    note = lock.acquire()
    assert note == f"took over a stale lock of PID {dead.pid} (no longer running) in {tmp_path}"
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert list(tmp_path.iterdir()) == []
    # another host's lock cannot be checked: refused, never taken over
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "started": "x"}))
    with pytest.raises(Exception, match=f"in use by PID {dead.pid} on host elsewhere"):
        WorkdirLock(tmp_path).acquire()


# ----------------------------------------------------------------------------------------------------------------------
def test_plot_curves_on_evaluation_metrics_and_loud_failures(tmp_path, capsys):
    from experiments import plot

    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": s, "loss": 3.0 / s} for s in range(1, 5)]
    recs += [
        {
            "step": s,
            "eval": "depo1",
            "depo1/accuracy": 0.1 * s,
            "depo1/accuracy_k1": 0.2 * s,
            "depo1/accuracy_k2": 0.05 * s,
            "depo1/count_k1": 10.0,
        }
        for s in (2, 4)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    data = plot.curve_data([run], ["depo1/accuracy_k*"])
    assert data == {
        ("run", "depo1/accuracy_k1"): ([2, 4], [0.4, 0.8]),
        ("run", "depo1/accuracy_k2"): ([2, 4], [0.1, 0.2]),
    }
    out = tmp_path / "plots" / "acc.png"
    assert plot.main(["curves", str(run), "--metric", "depo1/accuracy_k*", "--metric", "loss", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000

    capsys.readouterr()
    assert plot.main(["curves", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path / 'nope'}: no metrics.jsonl (not a run directory, or the run has not logged yet)\n"
    )
    assert plot.main(["curves", str(run), "--metric", "depo1/accuracy_k9", "--out", str(tmp_path / "x.png")]) == 2
    assert re.fullmatch(
        r"error: .*: no metric 'depo1/accuracy_k9'; metrics there: depo1/accuracy, "
        r"depo1/accuracy_k1, depo1/accuracy_k2, depo1/count_k1, loss\n",
        capsys.readouterr().err,
    )
    assert not (tmp_path / "x.png").exists()


def test_export_and_load_run_round_trip(corpus, tmp_path, capsys):
    import canon_jax
    from experiments import export

    raw = tiny_config(corpus, train={"steps": 2}, checkpoint={"every": 1, "async_save": False})
    summary = train(config_from_dict(raw), tmp_path / "run")
    model, params = canon_jax.load_run(tmp_path / "run")
    chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(summary["state"]["params"]))
    _, params1 = canon_jax.load_run(tmp_path / "run", step=1)
    assert not np.array_equal(params1["embed"]["embedding"], params["embed"]["embedding"])

    before = _tree_hashes(tmp_path / "run")
    assert export.main(["--workdir", str(tmp_path / "run"), "--step", "2", "--out", str(tmp_path / "hf")]) == 0
    assert _tree_hashes(tmp_path / "run") == before  # exporting reads only
    hf_model, hf_params = canon_jax.load_hf_checkpoint(str(tmp_path / "hf"))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 24)), jnp.int32)
    ours = model.apply({"params": params}, tokens)
    theirs = hf_model.apply({"params": hf_params}, tokens)
    chex.assert_shape(ours, (2, 24, 259))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    capsys.readouterr()
    assert export.main(["--workdir", str(tmp_path / "run"), "--step", "7", "--out", str(tmp_path / "hf2")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'run' / 'checkpoints'}: no checkpoint at step 7")
    assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_console_scripts_work_from_any_directory(tmp_path):
    """Every console script named in pyproject.toml imports and answers --help outside the repository; a shipped
    config is found by its repo-relative name from there."""
    text = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^(canon-[a-z-]+) = "([\w.]+:\w+)"$', text, re.M))
    assert {"canon-train", "canon-sweep", "canon-data", "canon-plot", "canon-export", "canon-compile"} <= set(scripts)
    assert "canon-build-native" in scripts
    present = {k: v for k, v in scripts.items() if (ROOT / (v.split(":")[0].replace(".", "/") + ".py")).is_file()}
    assert present == scripts  # every entry point exists
    code = (
        "import importlib, sys, contextlib, io\n"
        f"scripts = {present!r}\n"
        "for name, target in scripts.items():\n"
        "    mod, fn = target.split(':')\n"
        "    sys.argv = [name, '--help']\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        "            getattr(importlib.import_module(mod), fn)()\n"
        "        except SystemExit as e:\n"
        "            assert e.code in (0, None), (name, e.code)\n"
        "    assert buf.getvalue().startswith('usage: '), (name, buf.getvalue()[:200])\n"
        "    assert name != 'canon-train' or buf.getvalue().startswith('usage: canon-train'), buf.getvalue()[:200]\n"
        "    print(name, 'ok')\n"
        "from experiments.train import main\n"
        "sys.exit(main(['--config', 'configs/quickstart.yaml', '--print-config']))\n"
    )
    env = _env()
    env["CANON_JAX_MALLOC_HUGEPAGES"] = "0"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(f"{name} ok" in r.stdout for name in present)
    assert '"name": "quickstart"' in r.stdout
