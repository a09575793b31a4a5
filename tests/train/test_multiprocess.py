"""Two real JAX processes on localhost (``jax.distributed.initialize`` + gloo CPU collectives, 2 CPU devices each,
a (data 2, fsdp 2) mesh spanning both) train through the real ``train()`` entry, each process reading only its own
rows of every global batch. Their losses must equal a single-process, single-device run of the same config, and
their checkpoint must resume in a single process and continue exactly like the single-process run."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[2]
TIMEOUT_S = 240  # generous bound for a shared 2-core machine; a quiet run takes well under a minute


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"):  # no accidental cluster detection
        env.pop(k, None)
    return env


def _result(stdout: str) -> dict:
    return json.loads(next(l for l in stdout.splitlines() if l.startswith("RESULT "))[7:])


@pytest.mark.multidevice
def test_two_processes_match_single_process_and_checkpoint_resumes(tmp_path):
    worker = [sys.executable, "-m", "tests.train._multiprocess_worker"]
    port = _free_port()
    procs = [
        subprocess.Popen(
            worker + ["proc", str(tmp_path), str(i), str(port)],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S))
    finally:
        for p in procs:  # on a timeout or an exception, never leave a process waiting on its peer
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, (p, (_out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{err[-3000:]}"
    multi = [_result(out) for out, _ in outs]
    assert [m["pid"] for m in multi] == [0, 1]
    assert multi[0]["step"] == multi[1]["step"] == 3
    assert multi[0]["loss"] == multi[1]["loss"]  # the loss is one global value, seen identically by both

    r = subprocess.run(
        worker + ["single", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = _result(r.stdout)
    single, two = out["single"], out["multi"]
    assert sorted(two) == ["1", "2", "3"] and sorted(single) == ["1", "2", "3", "4"]
    for s in ("1", "2", "3"):  # same global batch, same math; only the reduction order across devices differs
        np.testing.assert_allclose(two[s], single[s], rtol=1e-5, err_msg=f"step {s}")
    np.testing.assert_allclose(multi[0]["loss"], single["3"], rtol=1e-5)
    # the 2-process checkpoint (step 3) restored on one device, data position included, gives the same step 4
    assert out["resumed_start"] == 3, out
    assert sorted(out["resumed"]) == ["1", "2", "3", "4"]
    np.testing.assert_allclose(out["resumed"]["4"], single["4"], rtol=1e-5)


def test_data_state_from_another_process_count(tmp_path):
    """Resuming with a process count the checkpoint was not written with: agreeing per-process states are reused,
    disagreeing ones are an error naming the states, and this process's own file takes precedence."""
    from canon_jax.train.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path / "ck", every=1, keep=2, async_save=False)
    data = tmp_path / "ck" / "7" / "data"
    data.mkdir(parents=True)
    assert ck._other_process_count_data(7) is None  # no files at all: the normal restore path reports it
    for i in range(2):
        (data / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": 3}))
    assert ck._other_process_count_data(7) == {"next_index": 3}
    (data / "process_1-of-2.json").write_text(json.dumps({"next_index": 4}))
    with pytest.raises(ValueError, match="differ"):
        ck._other_process_count_data(7)
    (data / "process_0-of-1.json").write_text(json.dumps({"next_index": 5}))
    assert ck._other_process_count_data(7) is None
    ck.close()
