"""8 simulated CPU devices (subprocess): a (data 2, fsdp 2, tensor 2) step equals the single-device step, and a
checkpoint written on one mesh restores onto other meshes."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[2]


@pytest.mark.multidevice
def test_sharded_step_and_cross_mesh_restore(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-m", "tests.train._multidevice_worker", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert out["init_equal"]
    assert any("fsdp" in s and "tensor" in s for s in out["specs"].values()), out["specs"]
    np.testing.assert_allclose(out["loss"][1], out["loss"][0], rtol=1e-6)
    np.testing.assert_allclose(out["grad_norm"][1], out["grad_norm"][0], rtol=1e-5)
    # Same math, different reduction order across devices. The Adam moments agree to float32 rounding; parameters
    # move by lr * m/(sqrt(v)+eps) per coordinate, which amplifies rounding in near-zero gradients, so their bound
    # is a small fraction of the two steps' total lr (2 * 0.01).
    assert out["max_opt_diff"] < 1e-6, out
    assert out["max_param_diff"] < 0.02 * 2 * 0.01, out
    for name, r in out["restored"].items():
        assert r["step"] == 2 and r["data"] == {"pos": 2}, name
        assert r["equal"] and r["layout"], name
    np.testing.assert_allclose(out["restored"]["single"]["next_loss"], out["next_loss_source"], rtol=1e-5)
