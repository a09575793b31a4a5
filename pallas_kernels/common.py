"""Shared plumbing of the ops: the implementation names, the target platform and kernel family, block sizes per
backend, compiler parameters, padding arithmetic."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.implementations import (  # noqa: F401  (re-exported: the ops import them from here)
    ATTENTION_IMPLS,
    IMPLEMENTATIONS,
    KERNEL_IMPLS,
    check_impl,
)

BACKENDS = ("tpu", "gpu")


def context_mesh():
    """The mesh set for the code being traced (an ``AbstractMesh``), or None when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def target_platform() -> str:
    """``"tpu"``, ``"gpu"`` or ``"cpu"``: the platform of the devices the program is compiled for, i.e. the context
    mesh's devices (also the abstract TPU/GPU devices of a deviceless ahead-of-time compile on a CPU host), else the
    process's default backend."""
    mesh = context_mesh()
    device = None if mesh is None else mesh.abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "cpu"


def accelerator_backend() -> str | None:
    """The kernel family of the target platform: ``"tpu"``, ``"gpu"``, or ``None`` on CPU."""
    platform = target_platform()
    return None if platform == "cpu" else platform


SCAN_LAYOUTS = ("auto", "time_major", "head_major")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the kernels.

    Attributes:
      block_t: rows (tokens) per short-conv tile; rounded up to the halo granularity (8 rows for 32-bit, 16 for
        16-bit inputs) and down to the padded sequence length.
      block_d: channels per short-conv tile; used when it divides the channel count, otherwise the whole channel
        axis is one tile (small widths) or the channels are zero-padded to a multiple of it.
      chunk: tokens per linear-scan chunk (the state is carried across chunks); ``None`` keeps the op's
        ``chunk_size`` argument.
      sub_chunk: tokens per secondary chunk inside a vector-gated (GLA) chunk: the intra-chunk decay factors are
        formed against a reference point inside each sub-chunk pair so every exponent stays a non-positive
        difference; the kernel uses ``gcd(chunk, sub_chunk)``.
      scan_layout: ``"auto"`` | ``"time_major"`` | ``"head_major"``: the scan's operand layout (``ScanLayout``).
        "auto" reads the callers' ``[B, T, H, D]`` in place (blocks along ``H*D``) on TPU when Dk and Dv are
        multiples of 128, and transposes to ``[B, H, T, D]`` otherwise (and always on GPU).
      block_dv: Mosaic GPU scan only: Dv columns of the state per CTA (a multiple of 64 dividing Dv); the grid is
        (batch, heads, Dv / block_dv) and each CTA keeps a ``[Dk, block_dv]`` float32 state slice in registers
        (64 -> 64 registers per thread at Dk = 128).
    """

    block_t: int = 256
    block_d: int = 512
    chunk: int | None = None
    sub_chunk: int = 16
    scan_layout: str = "auto"
    block_dv: int = 64

    def __post_init__(self):
        for name in ("block_t", "block_d", "sub_chunk", "block_dv"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {v!r}")
        if self.scan_layout not in SCAN_LAYOUTS:
            raise ValueError(f"BlockSizes.scan_layout must be one of {SCAN_LAYOUTS}, got {self.scan_layout!r}")
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 1):
            raise ValueError(f"BlockSizes.chunk must be None or a positive int, got {self.chunk!r}")

    @classmethod
    def default(cls, backend: str) -> BlockSizes:
        """Per-backend defaults.

        TPU: large lane-dense tiles (VMEM is 16-128 MiB; every grid step costs ~0.35 us, so tiles of 256x512 f32
        = 512 KiB keep the step overhead small). GPU (Mosaic GPU, H100): the conv tile must fit 227 KiB of shared
        memory *with* the weight rows pre-broadcast to the tile height (see ``short_conv/gpu.py``), so 32x128.
        """
        if backend == "tpu":
            return cls(block_t=256, block_d=512, sub_chunk=16)
        if backend == "gpu":
            return cls(block_t=32, block_d=128, sub_chunk=16)
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def resolve_backend(backend: str | None, interpret) -> str:
    """Which kernel family to build: the named ``backend``, else the target platform's (:func:`accelerator_backend`),
    else (CPU) ``"tpu"`` in interpret mode. Raises when a compiled kernel is asked for a CPU target."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        return backend
    family = accelerator_backend()
    if family is not None:
        return family
    if interpret:
        return "tpu"
    raise NotImplementedError(
        f"Pallas kernels need a TPU or GPU (the program is compiled for {target_platform()!r}); pass "
        "interpret=True to run them in interpret mode, or use the XLA implementation"
    )


def tpu_params(semantics):
    return pltpu.CompilerParams(dimension_semantics=tuple(semantics))


def gpu_params():
    return plgpu.CompilerParams()


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def sublane_rows(dtype) -> int:
    """Second-minor tile height of a TPU vreg for ``dtype`` (8 for 32-bit, 16 for 16-bit, 32 for 8-bit)."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)
