"""The short conv in XLA: a fused elementwise forward (every tap a shifted slice of ``[history, x]``, widened inside
the multiply-add) and a hand-written VJP (the anti-causal form of the backward)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.short_conv.reference import silu_grad


def history_and_segments(x, weight, segment_ids, initial_state):
    """``(prev, seg_h)``: the ``[B, K-1, C]`` history rows before ``x`` (from the state, else zeros) and the
    ``[B, K-1+T]`` segment ids with the history in the first token's segment (or None)."""
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
    return prev, seg_h


def final_state(x, initial_state, k):
    batch, _, channels = x.shape
    if initial_state is None:
        prev = jnp.zeros((batch, k, channels), x.dtype)
    else:
        prev = jnp.swapaxes(initial_state, 1, 2).astype(x.dtype)
    full = jnp.concatenate([prev, x], axis=1)
    return jnp.swapaxes(full[:, -k:, :], 1, 2)


def conv_forward(x, w, b, prev, seg_h, activation, residual):
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
    return conv_forward(x, w, b, prev, seg_h, activation, residual)[1].astype(x.dtype)


def _conv_xla_fwd(x, w, b, prev, seg_h, activation, residual):
    return _conv_xla(x, w, b, prev, seg_h, activation, residual), (x, w, b, prev, seg_h)


def _conv_xla_bwd(activation, residual, res, g):
    dx, dw, db, dprev = bwd_math(activation, residual, res, g)
    return dx, dw, db, dprev, None


def bwd_math(activation, residual, res, g):
    """``(dx, dw, db, dprev)``. With no activation the conv's gradient ``gp`` is ``g`` itself, read in its own dtype
    by each pass; with SiLU it is recomputed from the inputs as one float32 array (the only full-size temporary)."""
    x, w, b, prev, seg_h = res
    k, t = w.shape[0], x.shape[1]
    hist = k - 1
    if activation == "silu":
        pre = conv_forward(x, w, b, prev, seg_h, None, False)[0]
        gp = g.astype(jnp.float32) * silu_grad(pre)
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


def conv_xla(x, weight, bias, activation, segment_ids, initial_state, residual):
    """The conv on the XLA path (arguments as ``api.causal_conv1d``, already checked)."""
    prev, seg_h = history_and_segments(x, weight, segment_ids, initial_state)
    b = jnp.zeros((x.shape[2],), weight.dtype) if bias is None else bias
    return _conv_xla(x, weight, b, prev, seg_h, activation, residual)
