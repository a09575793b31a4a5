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

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["causal_conv1d", "causal_conv1d_step", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret")
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
            f"causal_conv1d: initial_state must be [batch, channels, K]={(batch, channels, k)}, got {initial_state.shape}")


def _history(x, initial_state, k):
    """``[batch, K - 1 + time, channels]``: the K-1 preceding raw inputs (state or zeros) followed by x."""
    batch, _, channels = x.shape
    if initial_state is None:
        prev = jnp.zeros((batch, k - 1, channels), x.dtype)
    else:
        prev = jnp.swapaxes(initial_state[:, :, 1:], 1, 2).astype(x.dtype)
    return jnp.concatenate([prev, x], axis=1)


def _final_state(x, initial_state, k):
    batch, _, channels = x.shape
    if initial_state is None:
        prev = jnp.zeros((batch, k, channels), x.dtype)
    else:
        prev = jnp.swapaxes(initial_state, 1, 2).astype(x.dtype)
    full = jnp.concatenate([prev, x], axis=1)
    return jnp.swapaxes(full[:, -k:, :], 1, 2)


def _xla_causal_conv1d(x, weight, bias, activation, segment_ids, initial_state, residual):
    k = weight.shape[0]
    t = x.shape[1]
    xh = _history(x, initial_state, k)
    w = weight.astype(jnp.float32)
    acc = jnp.zeros(x.shape, jnp.float32)
    if segment_ids is not None:
        # The state, if any, continues the segment of the first token.
        seg_prev = jnp.broadcast_to(segment_ids[:, :1], (x.shape[0], k - 1))
        seg_h = jnp.concatenate([seg_prev, segment_ids], axis=1)
    for j in range(k):
        # tap j looks (K - 1 - j) tokens back
        xs = xh[:, j:j + t, :].astype(jnp.float32)
        if segment_ids is not None:
            same = (seg_h[:, j:j + t] == segment_ids)[..., None]
            xs = jnp.where(same, xs, 0.0)
        acc = acc + xs * w[j]
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    if activation == "silu":
        acc = jax.nn.silu(acc)
    if residual:
        acc = acc + x.astype(jnp.float32)
    return acc.astype(x.dtype)


def causal_conv1d(x, weight, *, bias=None, activation: Optional[str] = None, segment_ids=None, initial_state=None,
                  return_final_state: bool = False, residual: bool = False, impl: str = "auto"):
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
      impl: ``"auto"`` (Pallas on TPU/GPU when available, XLA elsewhere), ``"xla"``, ``"pallas"`` or
        ``"pallas_interpret"`` (the Pallas kernel in interpret mode, any backend).

    Returns:
      ``y`` ``[batch, time, channels]`` in ``x.dtype`` (float32 accumulation), and the final state if requested.
    """
    _check_args(x, weight, bias, activation, segment_ids, initial_state)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"causal_conv1d: unknown impl {impl!r}; choose one of {IMPLEMENTATIONS}")
    k = weight.shape[0]
    y = None
    if impl != "xla":
        from canon_jax.ops import dispatch  # local import: pallas_kernels is optional at import time

        y = dispatch.short_conv(impl, x, weight, bias=bias, activation=activation, segment_ids=segment_ids,
                                initial_state=initial_state, residual=residual)
    if y is None:
        y = _xla_causal_conv1d(x, weight, bias, activation, segment_ids, initial_state, residual)
    if return_final_state:
        return y, _final_state(x, initial_state, k)
    return y


def causal_conv1d_step(x_t, state, weight, *, bias=None, activation: Optional[str] = None, residual: bool = False):
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
