"""Deviceless ahead-of-time compilation: abstract TPU / GPU devices to compile for, on a CPU-only host.

``get_target("v5e:2x2")`` returns the abstract devices of that topology (libtpu), ``get_target("h100:1x1x8")`` those
of an 8-GPU H100 host (the CUDA plugin, with the target description shipped in ``canon_jax/aot_targets``).
``jax.jit(f, in_shardings=...).lower(...).compile()`` on a mesh of them runs the real compiler (Mosaic, ptxas), so
compile errors, memory use and the kernels in the program are what the chip would see; nothing can be executed.

Requirements: the ``aot`` extra (libtpu, jax-cuda12-plugin, nvidia-cuda-nvcc-cu12, versions equal to jax's). The CUDA
plugin registers itself only if its driver/library check passes, which it cannot without a GPU: importing this module
sets ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``, which works when JAX has not loaded its plugins yet in the process (first
backend use); otherwise start the process with ``JAX_PLATFORMS=cpu`` or that variable set.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import importlib.util
import math
import os
from collections.abc import Sequence

import numpy as np
from jax.sharding import AxisType, Mesh

GiB = 1 << 30
# Lets the CUDA plugin register without a GPU (see the module docstring); read when JAX first loads its plugins.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

# Per-chip HBM and TensorCores seen as separate devices (v3 and 7x expose both cores of a chip; v4 is compiled as
# one megacore device per chip, as it is run). Figures: Google Cloud TPU system-architecture pages.
_TPU_CHIPS = {
    "v3": dict(hbm=32 * GiB, devices_per_chip=2, host_bounds=(2, 2, 1)),
    "v4": dict(hbm=32 * GiB, devices_per_chip=1, host_bounds=(2, 2, 1)),
    "v5e": dict(hbm=16 * GiB, devices_per_chip=1, host_bounds=(2, 2, 1)),
    "v5p": dict(hbm=95 * GiB, devices_per_chip=1, host_bounds=(2, 2, 1)),
    "v6e": dict(hbm=32 * GiB, devices_per_chip=1, host_bounds=(2, 2, 1)),
    "tpu7x": dict(hbm=192 * GiB, devices_per_chip=2, host_bounds=(2, 2, 1)),
}
# GPU chips: the target description file; HBM is read from its ``device_memory_size``.
_GPU_CHIPS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
TARGET_CHIPS = tuple(_TPU_CHIPS) + tuple(_GPU_CHIPS)


@dataclasses.dataclass(frozen=True)
class Target:
    """Abstract devices of one topology.

    Attributes:
      name: the topology name it was made from, e.g. ``"v5e:2x2"``.
      chip: ``"v5e"``, ``"h100"``, ...
      platform: ``"tpu"`` or ``"gpu"`` (the kernel family that runs there).
      devices: the abstract (compile-only) devices, in topology order.
      hbm_bytes: memory of one device (a chip, or one TensorCore where a chip shows two devices).
    """

    name: str
    chip: str
    platform: str
    devices: tuple
    hbm_bytes: int

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def _parse(name: str):
    chip, sep, layout = name.partition(":")
    chip = chip.strip().lower()
    try:
        dims = tuple(int(d) for d in layout.split("x")) if sep else ()
    except ValueError:
        dims = ()
    if chip not in TARGET_CHIPS or not dims or min(dims) < 1:
        raise ValueError(
            f"target {name!r}: expected CHIP:AxB[xC] with CHIP in {TARGET_CHIPS}, e.g. 'v5e:2x2', "
            "'v5p:4x4x4', 'h100:1x1x8' (GPU: partitions x hosts x GPUs per host)"
        )
    return chip, dims


def gpu_target_config(chip: str) -> str:
    """Text of the ``GpuTargetConfigProto`` shipped for ``chip`` (``"h100"`` or ``"h200"``)."""
    return importlib.resources.files("canon_jax").joinpath("aot_targets", _GPU_CHIPS[chip]).read_text()


def _gpu_hbm(config: str) -> int:
    for line in config.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "device_memory_size":
            return int(value)
    raise ValueError("GPU target description has no device_memory_size")


def ensure_ptxas_on_path() -> str:
    """Put the ``nvidia-cuda-nvcc-cu12`` wheel's ``bin`` first on ``PATH`` (Mosaic GPU looks for ``ptxas`` on
    ``PATH``, never in the wheel) and return that folder. Raises ``ImportError`` without the wheel."""
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("nvidia-cuda-nvcc-cu12 is not installed (pip install -e '.[aot]')")
    bin_dir = os.path.join(next(iter(spec.submodule_search_locations)), "bin")
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")
    return bin_dir


@functools.cache
def get_target(name: str) -> Target:
    """Abstract devices for a topology name: ``"v5e:2x2"``, ``"v5e:1x1"`` (one chip), ``"v5p:4x4x4"``,
    ``"v4:2x2x1"``, ``"v6e:8x8"``, ``"tpu7x:2x2x1"``, ``"h100:1x1x8"``, ``"h200:1x1x8"``."""
    from jax.experimental import topologies

    chip, dims = _parse(name)
    if chip in _GPU_CHIPS:
        ensure_ptxas_on_path()
        config = gpu_target_config(chip)
        try:
            topo = topologies.get_topology_desc(
                platform="cuda", target_config=config, topology="x".join(map(str, dims))
            )
        except NotImplementedError as e:
            raise RuntimeError(
                f"target {name!r}: the CUDA plugin is not registered in this process (jax-cuda12-plugin missing, or "
                "JAX's backends were initialised before; start with JAX_PLATFORMS=cpu or "
                "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1)"
            ) from e
        return Target(name, chip, "gpu", tuple(topo.devices), _gpu_hbm(config))
    # Several compiling processes (pytest workers, other jobs) may load libtpu at once: without this, all but the
    # first fail on libtpu's lock file. Nothing is run, so there is no device to share.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    info = _TPU_CHIPS[chip]
    kwargs = {}
    if chip == "v4":
        kwargs["chip_config_name"] = "megacore"
    dims3 = (dims + (1, 1))[:3]
    if any(d < b for d, b in zip(dims3, info["host_bounds"])):  # smaller than one host (e.g. one chip)
        kwargs["chips_per_host_bounds"] = list(dims3)
    topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{chip}:{'x'.join(map(str, dims))}", **kwargs)
    return Target(name, chip, "tpu", tuple(topo.devices), info["hbm"] // info["devices_per_chip"])


def make_mesh(target: Target, shape: Sequence[int], axis_names: Sequence[str]) -> Mesh:
    """A mesh of ``shape`` over all of ``target``'s devices (topology-aware order), axes of type ``Auto``."""
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) != target.num_devices:
        raise ValueError(f"mesh shape {shape} has {math.prod(shape)} devices; {target.name} has {target.num_devices}")
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {shape} and axis names {tuple(axis_names)} differ in length")
    try:
        from jax.experimental import mesh_utils

        devices = mesh_utils.create_device_mesh(shape, list(target.devices))
    except (ValueError, NotImplementedError, AssertionError):  # no physical layout known (GPU): plain order
        devices = np.asarray(target.devices, dtype=object).reshape(shape)
    return Mesh(devices, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape))


def platform_of(devices) -> str | None:
    """``"tpu"`` / ``"gpu"`` / ``"cpu"`` for a collection of devices (all of one platform), else ``None``."""
    platforms = {d.platform for d in devices}
    if len(platforms) != 1:
        return None
    p = platforms.pop()
    return "gpu" if p in ("gpu", "cuda", "rocm") else p
