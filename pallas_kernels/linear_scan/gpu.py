"""Mosaic GPU variant of the chunked scan: the TPU kernel body with a "sequential" chunk axis (Mosaic GPU runs
sequential grid axes as an in-kernel loop with TMA pipelining) and the state in shared memory.

Status in jax 0.10.2: see docs/kernels.md and ``tests/kernels/test_export.py`` for what lowers; the lowering error
for the parts that do not is recorded there verbatim.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.linear_scan import tpu


def scan_call(q, k, v, b, brow, st0, *, layout, scale, chunk, sub_chunk, out_dtype, interpret):
    """Same contract as ``tpu.scan_call``."""
    params = plgpu.CompilerParams(dimension_semantics=("parallel", "parallel", "sequential"))
    return tpu.scan_call(q, k, v, b, brow, st0, layout=layout, scale=scale, chunk=chunk, sub_chunk=sub_chunk,
                         out_dtype=out_dtype, interpret=interpret, params=params)
