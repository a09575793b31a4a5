"""Depthwise causal 1-D convolution over time: the math of a Canon layer.

Conventions (SPEC A.1, identical to the official release):

* ``x``: ``[batch, time, channels]`` (channels-last).
* ``weight``: ``[K, channels]``; ``weight[K - 1]`` multiplies the current token, ``weight[0]`` the token ``K - 1``
  steps back. (The PyTorch ``Conv1d`` layout ``[channels, 1, K]`` converts with ``w[:, 0, :].T``.)
* ``y[t, c] = sum_j weight[j, c] * x[t - (K - 1) + j, c] (+ bias[c])`` with ``x[s] = 0`` for ``s < 0`` (or taken
  from ``initial_state``), then the optional activation, then the optional residual ``x + y``.
* Decoding state ``[batch, channels, K]``: the last ``K`` *raw* inputs, oldest first, zero-left-padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from canon_jax.ops import cpu as _cpu
from pallas_kernels.common import check_impl, target_platform
from pallas_kernels.sharding import shard_map_call

__all__ = ["causal_conv1d", "causal_conv1d_step"]

_ACTIVATIONS = (None, "silu")


def _check_args(x, weight, bias, activation, segment_ids, initial_state):
    if x.ndim != 3:
        raise ValueError(f"causal_conv1d: x must be [batch, time, channels], got shape {x.shape}")
    if weight.ndim != 2:
        raise ValueError(f"causal_conv1d: weight must be [K, channels], got shape {weight.shape}")
    batch, _, channels = x.shape
    k = weight.shape[0]
    if k < 1:
        raise ValueError(f"causal_conv1d: kernel size K must be >= 1, got weight shape {weight.shape}")
    if weight.shape[1] != channels:
        raise ValueError(f"causal_conv1d: weight has {weight.shape[1]} channels but x has {channels}")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"causal_conv1d: bias must be [channels]=({channels},), got {bias.shape}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if segment_ids is not None and segment_ids.shape != x.shape[:2]:
        raise ValueError(f"causal_conv1d: segment_ids must be [batch, time]={x.shape[:2]}, got {segment_ids.shape}")
    if initial_state is not None and initial_state.shape != (batch, channels, k):
        raise ValueError(
            f"causal_conv1d: initial_state must be [batch, channels, K]={(batch, channels, k)}, "
            f"got {initial_state.shape}"
        )


def _final_state(x, initial_state, k):
    batch, _, channels = x.shape
    if initial_state is None:
        prev = jnp.zeros((batch, k, channels), x.dtype)
    else:
        prev = jnp.swapaxes(initial_state, 1, 2).astype(x.dtype)
    full = jnp.concatenate([prev, x], axis=1)
    return jnp.swapaxes(full[:, -k:, :], 1, 2)


def _silu_grad(pre):
    sig = jax.nn.sigmoid(pre)
    return sig * (1.0 + pre * (1.0 - sig))


def _conv_forward(x, w, b, prev, seg_h, activation, residual):
    """Float32 pre-activation and output. ``prev``: the ``K-1`` history rows (x's dtype); ``seg_h``: ``[B, K-1+T]``
    segment ids (history rows first) or None.

    Every tap reads a shifted slice of ``[prev, x]`` in the input dtype and widens it inside the multiply-add, so
    the whole sum is one elementwise pass: no float32 (or padded) copy of the input is materialised."""
    k, t = w.shape[0], x.shape[1]
    xh = jnp.concatenate([prev, x], axis=1)
    w32 = w.astype(jnp.float32)
    pre = None
    for j in range(k):  # tap j looks (K - 1 - j) tokens back
        term = xh[:, j : j + t].astype(jnp.float32) * w32[j]
        if seg_h is not None:  # a [B, T, 1] float mask per tap: compared once per token, not per channel
            term = term * (seg_h[:, j : j + t] == seg_h[:, k - 1 :]).astype(jnp.float32)[..., None]
        pre = term if pre is None else pre + term
    pre = pre + b.astype(jnp.float32)
    y = jax.nn.silu(pre) if activation == "silu" else pre
    if residual:
        y = y + x.astype(jnp.float32)
    return pre, y


# A hand-written VJP: autodiff of the K shifted multiply-adds produces K pad/accumulate passes plus K reductions
# that XLA's CPU backend does not fuse well; the explicit anti-causal form below is ~1.5x faster fwd+bwd. The forward
# saves only its inputs (no float32 pre-activation): the backward recomputes what it needs in the same passes.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _conv_xla(x, w, b, prev, seg_h, activation, residual):
    return _conv_forward(x, w, b, prev, seg_h, activation, residual)[1].astype(x.dtype)


def _conv_xla_fwd(x, w, b, prev, seg_h, activation, residual):
    return _conv_xla(x, w, b, prev, seg_h, activation, residual), (x, w, b, prev, seg_h)


def _conv_xla_bwd(activation, residual, res, g):
    dx, dw, db, dprev = _xla_bwd_math(activation, residual, res, g)
    return dx, dw, db, dprev, None


def _xla_bwd_math(activation, residual, res, g):
    """``(dx, dw, db, dprev)``. With no activation the conv's gradient ``gp`` is ``g`` itself, read in its own dtype
    by each pass; with SiLU it is recomputed from the inputs as one float32 array (the only full-size temporary)."""
    x, w, b, prev, seg_h = res
    k, t = w.shape[0], x.shape[1]
    hist = k - 1
    if activation == "silu":
        pre = _conv_forward(x, w, b, prev, seg_h, None, False)[0]
        gp = g.astype(jnp.float32) * _silu_grad(pre)
    else:
        gp = g
    w32 = w.astype(jnp.float32)
    xh = jnp.concatenate([prev, x], axis=1)
    # The gradient zero-extended by K-1 rows (and the segment ids by the last segment), so that every tap, causal or
    # anti-causal, is a slice of one array: XLA fuses slices of a concatenation into the consuming pass, where slices
    # of the bare array at unaligned row offsets become copies (TPU).
    gpe = jnp.concatenate([gp, jnp.zeros((gp.shape[0], hist, gp.shape[2]), gp.dtype)], axis=1)
    seg_e = (
        None
        if seg_h is None
        else jnp.concatenate([seg_h, jnp.broadcast_to(seg_h[:, -1:], (seg_h.shape[0], hist))], axis=1)
    )  # seg_e[K-1 + p] = segment of p

    def tap(j, lo, hi):
        """Tap j's share of the gradient at outputs lo..hi-1 (zero past T; masked to the output's segment), f32."""
        r = gpe[:, lo:hi].astype(jnp.float32)
        if seg_e is None:
            return r
        return r * (seg_e[:, lo + j : hi + j] == seg_e[:, hist + lo : hist + hi]).astype(jnp.float32)[..., None]

    # dx[s] = sum_j w[j] * tap_j[s + K-1-j]: an anti-causal conv of the gradient.
    dx = g.astype(jnp.float32) if residual else None
    for j in range(k):
        term = tap(j, k - 1 - j, k - 1 - j + t) * w32[j]
        dx = term if dx is None else dx + term
    # d prev[i] (history row i, i < K-1) = sum_{j <= i} w[j] * tap_j[i - j]
    dprev = jnp.zeros(prev.shape, jnp.float32)
    for j in range(min(k, hist)):
        rows = tap(j, 0, min(hist - j, t)) * w32[j]  # fewer than hist - j rows when T is short
        dprev = dprev + jnp.pad(rows, ((0, 0), (j, hist - j - rows.shape[1]), (0, 0)))
    dw = jnp.stack([jnp.sum(tap(j, 0, t) * xh[:, j : j + t].astype(jnp.float32), axis=(0, 1)) for j in range(k)])
    db = jnp.sum(gp.astype(jnp.float32), axis=(0, 1))
    return dx.astype(x.dtype), dw.astype(w.dtype), db.astype(b.dtype), dprev.astype(prev.dtype)


_conv_xla.defvjp(_conv_xla_fwd, _conv_xla_bwd)


# The native XLA:CPU kernel (canon_jax/ops/cpu): float32, no segment masks. ``jax.lax.platform_dependent`` lowers the
# FFI call only for CPU; any other lowering platform (e.g. ``jax.export`` for TPU/CUDA from this machine) gets the XLA
# formulas above, so a program traced on a CPU host stays portable.
def _native_prev(prev):
    return prev if prev.shape[1] > 0 else jnp.zeros((prev.shape[0], 1, prev.shape[2]), prev.dtype)


def _native_fwd_call(x, w, b, prev, activation, residual):
    return jax.ffi.ffi_call(_cpu.FWD_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential")(
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
    dx, dw, db, dprev = jax.ffi.ffi_call(_cpu.BWD_TARGET, out, vmap_method="sequential")(
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
        default=lambda *a: _conv_forward(*a, None, activation, residual)[1].astype(x.dtype),
    )


def _conv_native_fwd(x, w, b, prev, activation, residual):
    return _conv_native(x, w, b, prev, activation, residual), (x, w, b, prev)


def _conv_native_bwd(activation, residual, res, g):
    x, w, b, prev = res
    g = g.astype(x.dtype)

    def xla(x, w, b, prev, g):
        return _xla_bwd_math(activation, residual, (x, w, b, prev, None), g)

    return jax.lax.platform_dependent(
        x, w, b, prev, g, cpu=lambda *a: _native_bwd_call(*a, activation, residual), default=xla
    )


_conv_native.defvjp(_conv_native_fwd, _conv_native_bwd)


def _native_unsupported(x, weight, bias, segment_ids, initial_state) -> str | None:
    """Why the native CPU kernel cannot take this call (None when it can)."""
    if segment_ids is not None:
        return "segment_ids are not supported by the native CPU kernel"
    for name, a in (("x", x), ("weight", weight), ("bias", bias), ("initial_state", initial_state)):
        if a is not None and a.dtype != jnp.float32:
            return f"the native CPU kernel takes float32 only ({name} is {a.dtype})"
    return None


def _xla_causal_conv1d(x, weight, bias, activation, segment_ids, initial_state, residual, native=False):
    k = weight.shape[0]
    batch, t, channels = x.shape
    if initial_state is None:
        prev = jnp.zeros((batch, k - 1, channels), x.dtype)
    else:
        prev = jnp.swapaxes(initial_state[:, :, 1:], 1, 2).astype(x.dtype)
    seg_h = None
    if segment_ids is not None:
        # The state, if any, continues the segment of the first token.
        seg_h = jnp.concatenate([jnp.broadcast_to(segment_ids[:, :1], (batch, k - 1)), segment_ids], axis=1)
    b = jnp.zeros((channels,), weight.dtype) if bias is None else bias
    if native:
        # A custom call is not partitioned by XLA: under a mesh each device runs it on its own block.
        return shard_map_call(
            lambda x, w, b, prev: _conv_native(x, w, b, prev, activation, residual),
            x,
            weight,
            b,
            prev,
            in_axes=_NATIVE_AXES,
            out_axes=_NATIVE_AXES[0],
        )
    return _conv_xla(x, weight, b, prev, seg_h, activation, residual)


_NATIVE_AXES = (P("batch", None, "channels"), P(None, "channels"), P("channels"), P("batch", None, "channels"))


def causal_conv1d(
    x,
    weight,
    *,
    bias=None,
    activation: str | None = None,
    segment_ids=None,
    initial_state=None,
    return_final_state: bool = False,
    residual: bool = False,
    impl: str = "auto",
):
    """Depthwise causal convolution over time.

    Args:
      x: ``[batch, time, channels]``.
      weight: ``[K, channels]``, ``weight[K-1]`` multiplies the current token; any ``K >= 1``.
      bias: optional ``[channels]``.
      activation: ``None`` or ``"silu"`` (applied to the conv output, before the residual).
      segment_ids: optional int ``[batch, time]``; taps never reach a token of another segment (packed documents).
        An ``initial_state`` is treated as the history of the first token's segment.
      initial_state: optional ``[batch, channels, K]``, the last K raw inputs before ``x`` (oldest first).
      return_final_state: also return the ``[batch, channels, K]`` state after ``x``.
      residual: return ``x + conv(x)`` (the Canon residual), fused.
      impl: ``"auto"`` (Pallas when the program is compiled for TPU/GPU devices: the trace-time mesh's, else the
        default backend's; on CPU the native XLA-FFI kernel for float32 calls without segment ids, else XLA),
        ``"xla"``, ``"cpu"`` (the native CPU kernel; raises where it does not apply), ``"pallas"`` or
        ``"pallas_interpret"`` (the Pallas kernel in interpret mode, any backend).

    Returns:
      ``y`` ``[batch, time, channels]`` in ``x.dtype`` (float32 accumulation), and the final state if requested.
    """
    _check_args(x, weight, bias, activation, segment_ids, initial_state)
    check_impl("causal_conv1d", impl)
    k = weight.shape[0]
    y = None
    native = False
    if impl == "cpu" or (impl == "auto" and target_platform() == "cpu"):
        why = _native_unsupported(x, weight, bias, segment_ids, initial_state)
        if why is None and not _cpu.available():
            why = f"the native CPU kernel is unavailable: {_cpu.unavailable_reason()}"
            if impl == "auto":
                _cpu.warn_fallback_once()
        if impl == "cpu" and why is not None:
            raise NotImplementedError(f"causal_conv1d(impl='cpu'): {why}; use impl='xla'")
        native = why is None
    elif impl != "xla":
        from canon_jax.ops import dispatch  # local import: pallas_kernels is optional at import time

        y = dispatch.short_conv(
            impl,
            x,
            weight,
            bias=bias,
            activation=activation,
            segment_ids=segment_ids,
            initial_state=initial_state,
            residual=residual,
        )
    if y is None:
        y = _xla_causal_conv1d(x, weight, bias, activation, segment_ids, initial_state, residual, native=native)
    if return_final_state:
        return y, _final_state(x, initial_state, k)
    return y


def causal_conv1d_step(x_t, state, weight, *, bias=None, activation: str | None = None, residual: bool = False):
    """One decoding step.

    Args:
      x_t: ``[batch, channels]``, the new raw input.
      state: ``[batch, channels, K]``, the last K raw inputs (oldest first).
    Returns:
      ``(y_t [batch, channels], new_state [batch, channels, K])``.
    """
    k = weight.shape[0]
    if state.shape != (x_t.shape[0], x_t.shape[1], k):
        raise ValueError(f"causal_conv1d_step: state must be {(x_t.shape[0], x_t.shape[1], k)}, got {state.shape}")
    new_state = jnp.concatenate([state[:, :, 1:], x_t[:, :, None].astype(state.dtype)], axis=2)
    acc = jnp.einsum("bck,kc->bc", new_state.astype(jnp.float32), weight.astype(jnp.float32))
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    if activation == "silu":
        acc = jax.nn.silu(acc)
    if residual:
        acc = acc + x_t.astype(jnp.float32)
    return acc.astype(x_t.dtype), new_state
