"""The short conv on the native XLA:CPU kernel (``canon_jax.ops.cpu``, an XLA FFI target; float32, no segment ids),
with the XLA backward formulas of ``xla`` for any other lowering platform.

``canon_jax.ops.cpu`` is imported at call time: its package ``canon_jax.ops`` re-exports this folder's api, so an
import at module level would be circular.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels.sharding import shard_map_call
from pallas_kernels.short_conv.xla import bwd_math, conv_forward, history_and_segments


def cpu_kernel():
    """The ``canon_jax.ops.cpu`` module (build, availability and the FFI target names of the native kernel)."""
    return importlib.import_module("canon_jax.ops.cpu")


# The native XLA:CPU kernel (canon_jax/ops/cpu): float32, no segment masks. ``jax.lax.platform_dependent`` lowers the
# FFI call only for CPU; any other lowering platform (e.g. ``jax.export`` for TPU/CUDA from this machine) gets the XLA
# formulas of ``xla``, so a program traced on a CPU host stays portable.
def _native_prev(prev):
    return prev if prev.shape[1] > 0 else jnp.zeros((prev.shape[0], 1, prev.shape[2]), prev.dtype)


def _native_fwd_call(x, w, b, prev, activation, residual):
    return jax.ffi.ffi_call(cpu_kernel().FWD_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential")(
        x, w, b, _native_prev(prev), silu=np.int32(activation == "silu"), residual=np.int32(residual)
    )


def _native_bwd_call(x, w, b, prev, g, activation, residual):
    p = _native_prev(prev)
    out = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct(w.shape, w.dtype),
        jax.ShapeDtypeStruct(b.shape, b.dtype),
        jax.ShapeDtypeStruct(p.shape, p.dtype),
    )
    dx, dw, db, dprev = jax.ffi.ffi_call(cpu_kernel().BWD_TARGET, out, vmap_method="sequential")(
        g, x, w, b, p, silu=np.int32(activation == "silu"), residual=np.int32(residual)
    )
    return dx, dw, db, dprev[:, : prev.shape[1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _conv_native(x, w, b, prev, activation, residual):
    return jax.lax.platform_dependent(
        x,
        w,
        b,
        prev,
        cpu=lambda *a: _native_fwd_call(*a, activation, residual),
        default=lambda *a: conv_forward(*a, None, activation, residual)[1].astype(x.dtype),
    )


def _conv_native_fwd(x, w, b, prev, activation, residual):
    return _conv_native(x, w, b, prev, activation, residual), (x, w, b, prev)


def _conv_native_bwd(activation, residual, res, g):
    x, w, b, prev = res
    g = g.astype(x.dtype)

    def xla(x, w, b, prev, g):
        return bwd_math(activation, residual, (x, w, b, prev, None), g)

    return jax.lax.platform_dependent(
        x, w, b, prev, g, cpu=lambda *a: _native_bwd_call(*a, activation, residual), default=xla
    )


_conv_native.defvjp(_conv_native_fwd, _conv_native_bwd)


def unsupported(x, weight, bias, segment_ids, initial_state) -> str | None:
    """Why the native CPU kernel cannot take this call (None when it can)."""
    if segment_ids is not None:
        return "segment_ids are not supported by the native CPU kernel"
    for name, a in (("x", x), ("weight", weight), ("bias", bias), ("initial_state", initial_state)):
        if a is not None and a.dtype != jnp.float32:
            return f"the native CPU kernel takes float32 only ({name} is {a.dtype})"
    return None


_NATIVE_AXES = (P("batch", None, "channels"), P(None, "channels"), P("channels"), P("batch", None, "channels"))


def conv_native(x, weight, bias, activation, initial_state, residual):
    """The conv on the native kernel (arguments as ``api.causal_conv1d``, checked, ``unsupported(...)`` None). A custom
    call is not partitioned by XLA: under a mesh each device runs it on its own block."""
    prev, _ = history_and_segments(x, weight, None, initial_state)
    b = jnp.zeros((x.shape[2],), weight.dtype) if bias is None else bias
    return shard_map_call(
        lambda x, w, b, prev: _conv_native(x, w, b, prev, activation, residual),
        x,
        weight,
        b,
        prev,
        in_axes=_NATIVE_AXES,
        out_axes=_NATIVE_AXES[0],
    )
