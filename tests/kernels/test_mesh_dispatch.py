"""Kernels on a mesh (8 simulated CPU devices, subprocess): under ``jax.set_mesh`` the op dispatch runs the Pallas
kernels (interpret mode) per device through ``shard_map`` for pure-FSDP, data x FSDP and tensor-parallel meshes,
with the values and gradients of the unsharded XLA path; a tiny Mamba2-Canon trainer step with
``kernel_impl="pallas_interpret"`` equals the ``kernel_impl="xla"`` step on a (2, 2, 2) mesh."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.multidevice
def test_kernels_under_meshes_match_xla(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "tests.kernels._mesh_check", str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert out["ops"] == ["data2_fsdp2_tensor2", "data2_fsdp4", "fsdp8"]
    for name, r in out["train"].items():
        assert r["shard_map_in_step"], name
        np.testing.assert_allclose(r["loss"][1], r["loss"][0], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(r["grad_norm"][1], r["grad_norm"][0], rtol=1e-5, err_msg=name)
        # Adam moves each parameter by lr * m / (sqrt(v) + eps), which amplifies rounding in near-zero gradients: the
        # bound is a small fraction of the step's lr (0.01), as in tests/train/test_multidevice.py
        assert r["max_param_diff"] < 0.02 * 0.01, (name, r)
