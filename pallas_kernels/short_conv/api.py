"""Public entry point of the short-conv kernel."""

from __future__ import annotations

from pallas_kernels.common import BlockSizes, resolve_backend
from pallas_kernels.short_conv.op import _Static, short_conv_op

_ACTIVATIONS = (None, "silu")


def supports(*, backend: str | None = None, interpret: bool = False, segment_ids=None) -> bool:
    """Whether the kernel of ``backend`` (default: the current device's) handles this call."""
    try:
        resolve_backend(backend, interpret)
    except NotImplementedError:
        return False
    del segment_ids  # both kernel families handle segment ids
    return True


def short_conv(
    x,
    weight,
    *,
    bias=None,
    activation: str | None = None,
    segment_ids=None,
    initial_state=None,
    residual: bool = False,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
):
    """Depthwise causal conv, fused bias/SiLU/residual, as a Pallas kernel with a custom VJP.

    ``y[b, t, c] = act(sum_j weight[j, c] * x[b, t - (K - 1) + j, c] + bias[c]) (+ x[b, t, c])`` with
    float32 accumulation; semantics identical to ``canon_jax.ops.conv.causal_conv1d``.

    Args:
      x: ``[batch, time, channels]`` (float32 or bfloat16).
      weight: ``[K, channels]``, any ``K >= 1``; ``weight[K-1]`` multiplies the current token.
      bias: optional ``[channels]``.
      activation: ``None`` or ``"silu"``.
      segment_ids: optional int ``[batch, time]``; taps never cross into another segment.
      initial_state: optional ``[batch, channels, K]``, the last K raw inputs before ``x`` (oldest first).
      residual: add ``x`` to the output.
      interpret: run the kernel in Pallas interpret mode (any device); ``True``, or a
        ``jax.experimental.pallas.tpu.InterpretParams`` for the TPU family's stricter interpreter (NaN-filled
        scratch, out-of-bounds and race checks).
      block_sizes: tile sizes; default ``BlockSizes.default(backend)``.
      backend: ``"tpu"`` or ``"gpu"`` kernel family; default the current device's (``"tpu"`` under interpret on CPU).

    Returns:
      ``y``: ``[batch, time, channels]`` in ``x.dtype``. (The final state is a slice of the inputs; the op computes
      it outside the kernel.)
    """
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(f"short_conv: x must be a non-empty [batch, time, channels], got shape {x.shape}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[2] or weight.shape[0] < 1:
        raise ValueError(f"short_conv: weight must be [K>=1, channels={x.shape[2]}], got shape {weight.shape}")
    k = weight.shape[0]
    if bias is not None and bias.shape != (x.shape[2],):
        raise ValueError(f"short_conv: bias must be [channels]=({x.shape[2]},), got {bias.shape}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"short_conv: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if segment_ids is not None and segment_ids.shape != x.shape[:2]:
        raise ValueError(f"short_conv: segment_ids must be [batch, time]={x.shape[:2]}, got {segment_ids.shape}")
    if initial_state is not None and initial_state.shape != (x.shape[0], x.shape[2], k):
        raise ValueError(
            f"short_conv: initial_state must be [batch, channels, K]={(x.shape[0], x.shape[2], k)}, "
            f"got {initial_state.shape}"
        )
    be = resolve_backend(backend, interpret)
    if be == "gpu" and not isinstance(interpret, bool):
        raise ValueError("short_conv: interpret must be a bool for the GPU kernel family (InterpretParams is TPU's)")
    bs = block_sizes if block_sizes is not None else BlockSizes.default(be)
    st = _Static(activation=activation, residual=bool(residual), backend=be, interpret=interpret, block_sizes=bs)
    return short_conv_op(x, weight, bias, segment_ids, initial_state, st)
