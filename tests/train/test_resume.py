"""Kill/resume acceptance test (subprocesses running ``python -m experiments.train``).

* SIGKILL at a random step, re-run the same command: every step's loss equals the uninterrupted run's (1e-6).
* SIGTERM (preemption) leaves a checkpoint at the current step and exits with status 0.
"""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import yaml

from canon_jax.train.checkpoint import Checkpointer
from canon_jax.train.metrics import read_metrics
from tests.train._util import tiny_config, write_corpus

ROOT = pathlib.Path(__file__).parents[2]


def _cmd(cfg_path, workdir):
    return [sys.executable, "-m", "experiments.train", "--config", str(cfg_path), "--workdir", str(workdir)]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return env


def _steps(workdir):
    return [r["step"] for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl") if "loss" in r]


def _wait_for_step(proc, workdir, step, stale=None, timeout=400):
    """Wait until ``proc`` has logged ``step``. A resumed run first drops the records after its checkpoint, then
    appends; ``stale`` (the records left by the killed run) must have been replaced."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = _steps(workdir)
        if steps and max(steps) >= step and steps == list(range(1, len(steps) + 1)) and steps != stale:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl") if "loss" in r}


def test_sigkill_resume_equals_uninterrupted_and_sigterm_saves(tmp_path):
    files = write_corpus(tmp_path / "corpus")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(files, train={"steps": 8}, checkpoint={"every": 2})))
    wa, wb = tmp_path / "uninterrupted", tmp_path / "interrupted"
    kw = dict(cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    a = subprocess.Popen(_cmd(cfg_path, wa), **kw)
    _wait_for_step(a, wa, 1)  # compiled (and cached for the others)
    b = subprocess.Popen(_cmd(cfg_path, wb), **kw)
    kill_at = random.randint(2, 5)
    print("SIGKILL after step", kill_at)
    _wait_for_step(b, wb, kill_at)
    b.kill()
    b.wait()
    assert b.returncode == -signal.SIGKILL

    # resume, then preempt with SIGTERM once it has made progress past the restored checkpoint
    restored = Checkpointer(wb / "checkpoints", 2, 5).latest_step() or 0
    stale = _steps(wb)
    b2 = subprocess.Popen(_cmd(cfg_path, wb), **kw)
    _wait_for_step(b2, wb, restored + 1, stale=stale)
    b2.send_signal(signal.SIGTERM)
    _, err = b2.communicate(timeout=300)
    assert b2.returncode == 0, err[-2000:]
    last = max(_losses(wb))
    assert last < 8, "SIGTERM arrived after the run finished; the test needs a longer run"
    assert Checkpointer(wb / "checkpoints", 2, 5).latest_step() == last  # checkpoint at the current step

    b3 = subprocess.run(_cmd(cfg_path, wb), **{**kw, "stderr": subprocess.PIPE}, timeout=400)
    assert b3.returncode == 0, b3.stderr[-2000:]
    _, err = a.communicate(timeout=400)
    assert a.returncode == 0, err[-2000:]

    la, lb = _losses(wa), _losses(wb)
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    np.testing.assert_allclose([lb[s] for s in sorted(lb)], [la[s] for s in sorted(la)], rtol=0, atol=1e-6)
    records = read_metrics(wb / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # no duplicated steps after resume
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(records[-1])
