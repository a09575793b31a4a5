"""Kernels on a mesh (8 simulated CPU devices, subprocess): under ``jax.set_mesh`` the op dispatch runs the Pallas
kernels (interpret mode) per device through ``shard_map`` for pure-FSDP, data x FSDP and tensor-parallel meshes,
with the values and gradients of the unsharded XLA path; a tiny Mamba2-Canon trainer step with
``kernel_impl="pallas_interpret"`` equals the ``kernel_impl="xla"`` step on a (2, 2, 2) mesh."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels.common import accelerator_backend, target_platform
from pallas_kernels.sharding import resolve_logical_axes, shard_map_call

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.multidevice
def test_kernels_under_meshes_match_xla(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels._mesh_check", str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
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


# ----------------------------------------------------------------------------------------------------------------------
# The resolution of logical axes and the platform choice, on abstract meshes (no devices needed).
def _abstract_mesh(sizes, platform=None):
    dev = None if platform is None else AbstractDevice(device_kind=f"{platform} chip", num_cores=1, platform=platform)
    return AbstractMesh(tuple(sizes), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3, abstract_device=dev)


def test_logical_axes_resolve_by_the_rules_table_and_divisibility():
    mesh = _abstract_mesh((2, 4, 2))
    x, w = P("batch", None, "channels"), P(None, "channels")
    assert resolve_logical_axes([(8, 5, 6), (4, 6)], [x, w], mesh) == {
        "batch": ("data", "fsdp"),
        "channels": ("tensor",),
    }
    # batch 2: only the first batch axis divides it; 7 channels: replicated in every argument that carries them
    assert resolve_logical_axes([(2, 5, 7), (4, 7)], [x, w], mesh) == {"batch": ("data",), "channels": ()}
    assert resolve_logical_axes([(3, 5, 8)], [x], mesh) == {"batch": (), "channels": ("tensor",)}
    # size-1 axes are dropped; a name mapped to an axis another name took first (embed -> fsdp) stays whole
    mesh1 = _abstract_mesh((1, 8, 1))
    assert resolve_logical_axes([(8, 5, 16)], [P("batch", None, "embed")], mesh1) == {"batch": ("fsdp",), "embed": ()}
    assert resolve_logical_axes([(8, 4)], [P("batch", "heads")], mesh1) == {"batch": ("fsdp",), "heads": ()}
    # a custom rules table
    assert resolve_logical_axes([(8, 6)], [P("batch", "channels")], mesh, rules=(("batch", "data"),)) == {
        "batch": ("data",),
        "channels": (),
    }


def test_platform_comes_from_the_mesh_devices():

    no_mesh = target_platform()
    assert no_mesh == {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(jax.default_backend(), "cpu")
    for platform, want in (("tpu", "tpu"), ("gpu", "gpu"), ("cuda", "gpu"), ("cpu", "cpu")):
        with jax.sharding.use_abstract_mesh(_abstract_mesh((1, 1, 1), platform)):
            assert target_platform() == want
            assert accelerator_backend() == (None if want == "cpu" else want)
    with jax.sharding.use_abstract_mesh(_abstract_mesh((1, 1, 1))):  # no device information: the default backend
        assert target_platform() == no_mesh
    # a mesh whose axes all have size 1 needs no shard_map: the function is called directly
    with jax.sharding.use_abstract_mesh(_abstract_mesh((1, 1, 1), "tpu")):
        out = shard_map_call(lambda a, b: (a, b), jnp.ones(2), None, in_axes=(P("batch"), None), out_axes=None)
        assert out[1] is None


def test_shard_map_call_rejects_mismatched_axes():
    mesh = _abstract_mesh((2, 1, 1), "cpu")
    with jax.sharding.use_abstract_mesh(mesh):
        with pytest.raises(ValueError, match="2 arguments but 1 in_axes"):
            shard_map_call(lambda a, b: a, jnp.ones((2, 3)), jnp.ones(2), in_axes=(P("batch", None),), out_axes=P())
        with pytest.raises(ValueError, match=r"shape \(2, 3\) but logical axes"):
            shard_map_call(lambda a: a, jnp.ones((2, 3)), in_axes=(P("batch"),), out_axes=P("batch"))
        with pytest.raises(ValueError, match="heads"):
            shard_map_call(lambda a: a, jnp.ones((2, 3)), in_axes=(P("batch", None),), out_axes=P("batch", "heads"))
