"""References for the short (depthwise causal) convolution: a float64 numpy loop and the XLA pieces of the backward.

Semantics (as the official release): ``y[t, c] = act(sum_j w[j, c] * x[t - (K - 1) + j, c] + bias[c]) (+ x[t, c])``;
taps before the sequence come from ``initial_state`` ``[B, C, K]`` (the last K raw inputs, oldest first; slot 0 is
never read) or are zero; with ``segment_ids`` a tap only reads tokens of the same segment, and the initial state
continues the first token's segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def short_conv_reference(x, weight, bias=None, activation=None, segment_ids=None, initial_state=None, residual=False):
    """float64 token loop. x: [B, T, C], weight: [K, C] -> y: [B, T, C] (numpy float64)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(weight, np.float64)
    bsz, t_len, ch = x.shape
    k = w.shape[0]
    y = np.zeros_like(x)
    for b in range(bsz):
        for t in range(t_len):
            acc = np.zeros(ch) if bias is None else np.asarray(bias, np.float64).copy()
            for j in range(k):
                s = k - 1 - j  # tokens back
                src = t - s
                if src >= 0:
                    if segment_ids is not None and segment_ids[b, src] != segment_ids[b, t]:
                        continue
                    acc += w[j] * x[b, src]
                elif initial_state is not None:
                    if segment_ids is not None and segment_ids[b, 0] != segment_ids[b, t]:
                        continue
                    acc += w[j] * np.asarray(initial_state, np.float64)[b, :, k + src]
            if activation == "silu":
                acc = acc / (1.0 + np.exp(-acc))
            y[b, t] = acc + (x[b, t] if residual else 0.0)
    return y


def tap_masks(segment_ids, k: int):
    """``[B, T, K]`` bool: entry ``[b, t, s]`` says whether the tap ``s`` tokens back from ``t`` is the same segment.
    Positions before the sequence (the initial state) count as the first token's segment."""
    bsz, t_len = segment_ids.shape
    seg_h = jnp.concatenate([jnp.broadcast_to(segment_ids[:, :1], (bsz, k - 1)), segment_ids], axis=1)
    return jnp.stack([seg_h[:, k - 1 - s : k - 1 - s + t_len] == segment_ids for s in range(k)], axis=-1)


def history(x, initial_state, k: int):
    """``[B, K - 1 + T, C]``: the K-1 raw inputs before ``x`` (from the state, else zeros), then ``x``."""
    bsz, _, ch = x.shape
    if initial_state is None:
        prev = jnp.zeros((bsz, k - 1, ch), x.dtype)
    else:
        prev = jnp.swapaxes(initial_state[:, :, 1:], 1, 2).astype(x.dtype)
    return jnp.concatenate([prev, x], axis=1)


def conv_pre_xla(x, weight, bias, segment_ids, initial_state):
    """XLA pre-activation ``sum_j w[j] x[t-(K-1)+j] (+ bias)`` in float32, ``[B, T, C]``."""
    k, t_len = weight.shape[0], x.shape[1]
    xh = history(x, initial_state, k).astype(jnp.float32)
    masks = None if segment_ids is None else tap_masks(segment_ids, k)
    acc = jnp.zeros(x.shape, jnp.float32)
    for j in range(k):
        s = k - 1 - j
        tap = xh[:, j : j + t_len]
        if masks is not None:
            tap = jnp.where(masks[..., s : s + 1], tap, 0.0)
        acc = acc + tap * weight[j].astype(jnp.float32)
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    return acc


def dweight_xla(g, x, k, segment_ids, initial_state):
    """``dw[j] = sum_{b,t} g[b,t] * x[b, t-(K-1)+j]`` (masked taps), float32 ``[K, C]``.

    g: ``[B, T, C]`` float32, the gradient with respect to the pre-activation."""
    t_len = x.shape[1]
    xh = history(x, initial_state, k).astype(jnp.float32)
    masks = None if segment_ids is None else tap_masks(segment_ids, k)
    rows = []
    for j in range(k):
        s = k - 1 - j
        prod = g * xh[:, j : j + t_len]
        if masks is not None:
            prod = jnp.where(masks[..., s : s + 1], prod, 0.0)
        rows.append(jnp.sum(prod, axis=(0, 1)))
    return jnp.stack(rows)


def dhistory_xla(g, weight, segment_ids):
    """Gradient with respect to the K-1 history rows before the sequence, float32 ``[B, K-1, C]``.

    History row ``r`` sits at position ``r - (K-1)``; output ``t`` reads it through tap ``s = t - r + K - 1`` for
    ``t < s``."""
    k = weight.shape[0]
    bsz, t_len, ch = g.shape
    masks = None if segment_ids is None else tap_masks(segment_ids, k)
    dh = jnp.zeros((bsz, k - 1, ch), jnp.float32)
    for s in range(1, k):
        n = min(s, t_len)  # outputs t = 0..n-1 reach back before the sequence through tap s
        contrib = g[:, :n] * weight[k - 1 - s].astype(jnp.float32)
        if masks is not None:
            contrib = jnp.where(masks[:, :n, s : s + 1], contrib, 0.0)
        dh = dh.at[:, k - 1 - s : k - 1 - s + n].add(contrib)
    return dh


def dx_xla(g, weight, segment_ids):
    """Anti-causal conv: ``dx[t] = sum_s w[K-1-s] * g[t+s]`` (masked), float32 ``[B, T, C]``."""
    k = weight.shape[0]
    t_len = g.shape[1]
    masks = None if segment_ids is None else tap_masks(segment_ids, k)
    gp = jnp.concatenate([g, jnp.zeros((g.shape[0], k - 1, g.shape[2]), g.dtype)], axis=1)
    acc = jnp.zeros(g.shape, jnp.float32)
    for s in range(k):
        src = gp[:, s : s + t_len]
        if masks is not None:
            mp = jnp.concatenate([masks[..., s], jnp.zeros((g.shape[0], k - 1), bool)], axis=1)[:, s : s + t_len]
            src = jnp.where(mp[..., None], src, 0.0)
        acc = acc + src * weight[k - 1 - s].astype(jnp.float32)
    return acc


def silu_grad(pre):
    sig = jax.nn.sigmoid(pre)
    return sig * (1.0 + pre * (1.0 - sig))
