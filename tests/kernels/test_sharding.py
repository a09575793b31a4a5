"""The kernels under ``pallas_kernels.sharding.shard_map_call`` on 8 simulated CPU devices equal the unsharded
kernels (interpret mode). Runs in a subprocess: forcing 8 host devices slows every program in the process that
does it."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.multidevice
def test_sharded_wrappers_match_unsharded():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).with_name("_sharded_check.py"))],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
