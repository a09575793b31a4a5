"""The short (depthwise causal) convolution: the op behind a Canon layer, its one ``impl=`` switch and its checks.

Conventions (identical to the official release):

* ``x``: ``[batch, time, channels]`` (channels-last).
* ``weight``: ``[K, channels]``; ``weight[K - 1]`` multiplies the current token, ``weight[0]`` the token ``K - 1``
  steps back. (The PyTorch ``Conv1d`` layout ``[channels, 1, K]`` converts with ``w[:, 0, :].T``.)
* ``y[t, c] = sum_j weight[j, c] * x[t - (K - 1) + j, c] (+ bias[c])`` with ``x[s] = 0`` for ``s < 0`` (or taken
  from ``initial_state``), then the optional activation, then the optional residual ``x + y``.
* Decoding state ``[batch, channels, K]``: the last ``K`` *raw* inputs, oldest first, zero-left-padded.

Implementations: ``xla`` (XLA, hand-written VJP), ``native`` (the native XLA:CPU kernel), ``op`` (the Pallas kernels
of ``tpu`` and ``gpu`` with their custom VJP), ``reference`` (float64 loop and XLA pieces of the Pallas backward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.common import BlockSizes, accelerator_backend, check_impl, resolve_backend, target_platform
from pallas_kernels.sharding import shard_map_call
from pallas_kernels.short_conv import native
from pallas_kernels.short_conv.op import _Static, short_conv_op
from pallas_kernels.short_conv.xla import conv_xla, final_state

__all__ = ["causal_conv1d", "causal_conv1d_step", "short_conv", "supports", "CONV_AXES"]

_ACTIVATIONS = (None, "silu")

# Logical axes of (x, weight, bias, segment_ids, initial_state): batch and channels split, time whole.
CONV_AXES = (
    P("batch", None, "channels"),
    P(None, "channels"),
    P("channels"),
    P("batch", None),
    P("batch", "channels", None),
)


def _check_args(op, x, weight, bias, activation, segment_ids, initial_state):
    if x.ndim != 3:
        raise ValueError(f"{op}: x must be [batch, time, channels], got shape {x.shape}")
    if weight.ndim != 2:
        raise ValueError(f"{op}: weight must be [K, channels], got shape {weight.shape}")
    batch, _, channels = x.shape
    k = weight.shape[0]
    if k < 1:
        raise ValueError(f"{op}: kernel size K must be >= 1, got weight shape {weight.shape}")
    if weight.shape[1] != channels:
        raise ValueError(f"{op}: weight has {weight.shape[1]} channels but x has {channels}")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"{op}: bias must be [channels]=({channels},), got {bias.shape}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if segment_ids is not None and segment_ids.shape != x.shape[:2]:
        raise ValueError(f"{op}: segment_ids must be [batch, time]={x.shape[:2]}, got {segment_ids.shape}")
    if initial_state is not None and initial_state.shape != (batch, channels, k):
        raise ValueError(
            f"{op}: initial_state must be [batch, channels, K]={(batch, channels, k)}, got {initial_state.shape}"
        )


def supports(*, backend: str | None = None, interpret: bool = False, segment_ids=None) -> bool:
    """Whether the kernel of ``backend`` (default: the target platform's) handles this call."""
    try:
        resolve_backend(backend, interpret)
    except NotImplementedError:
        return False
    del segment_ids  # both kernel families handle segment ids
    return True


def _pallas(x, weight, bias, activation, segment_ids, initial_state, residual, interpret, block_sizes, backend):
    """The Pallas kernel on checked arguments."""
    if 0 in x.shape:
        raise ValueError(f"short_conv: x must be non-empty, got shape {x.shape}")
    be = resolve_backend(backend, interpret)
    if be == "gpu" and not isinstance(interpret, bool):
        raise ValueError("short_conv: interpret must be a bool for the GPU kernel family (InterpretParams is TPU's)")
    bs = block_sizes if block_sizes is not None else BlockSizes.default(be)
    st = _Static(activation=activation, residual=bool(residual), backend=be, interpret=interpret, block_sizes=bs)
    return short_conv_op(x, weight, bias, segment_ids, initial_state, st)


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
    """The Pallas kernel of :func:`causal_conv1d` (fused bias/SiLU/residual, custom VJP), called directly: one device,
    no ``shard_map``.

    Args:
      x, weight, bias, activation, segment_ids, initial_state, residual: as in :func:`causal_conv1d` (x non-empty,
        float32 or bfloat16).
      interpret: run the kernel in Pallas interpret mode (any device); ``True``, or a
        ``jax.experimental.pallas.tpu.InterpretParams`` for the TPU family's stricter interpreter (NaN-filled
        scratch, out-of-bounds and race checks).
      block_sizes: tile sizes; default ``BlockSizes.default(backend)``.
      backend: ``"tpu"`` or ``"gpu"`` kernel family; default the target platform's (``"tpu"`` under interpret on
        CPU).

    Returns:
      ``y``: ``[batch, time, channels]`` in ``x.dtype``. (The final state is a slice of the inputs: see
      :func:`causal_conv1d`.)
    """
    _check_args("short_conv", x, weight, bias, activation, segment_ids, initial_state)
    return _pallas(x, weight, bias, activation, segment_ids, initial_state, residual, interpret, block_sizes, backend)


def _pallas_sharded(impl, x, weight, bias, activation, segment_ids, initial_state, residual):
    """The Pallas kernel for ``impl`` ("pallas" / "pallas_interpret" / "auto" on TPU or GPU), per device under a
    mesh; ``None`` when ``impl="auto"`` and the target's kernel does not take the call."""
    interpret = impl == "pallas_interpret"
    backend = accelerator_backend()
    if impl == "pallas" and backend is None:
        raise NotImplementedError(
            f"causal_conv1d: impl='pallas' needs TPU or GPU devices (the program is compiled for "
            f"{target_platform()!r}); use impl='pallas_interpret' to run the kernel in interpret mode, or impl='xla'"
        )
    if impl == "auto" and not supports(backend=backend, interpret=interpret, segment_ids=segment_ids):
        return None

    def local(x, weight, bias, segment_ids, initial_state):
        return _pallas(x, weight, bias, activation, segment_ids, initial_state, residual, interpret, None, backend)

    return shard_map_call(local, x, weight, bias, segment_ids, initial_state, in_axes=CONV_AXES, out_axes=CONV_AXES[0])


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
      impl: one of ``pallas_kernels.common.IMPLEMENTATIONS["causal_conv1d"]``: ``"auto"`` (Pallas when the program
        is compiled for TPU/GPU devices: the trace-time mesh's, else the default backend's; on CPU the native XLA-FFI
        kernel for float32 calls without segment ids, else XLA), ``"xla"``, ``"cpu"`` (the native CPU kernel;
        raises where it does not apply), ``"pallas"`` or ``"pallas_interpret"`` (the Pallas kernel in interpret
        mode, any backend). Under a mesh the kernels run per device (``pallas_kernels.sharding.shard_map_call``).

    Returns:
      ``y`` ``[batch, time, channels]`` in ``x.dtype`` (float32 accumulation), and the final state if requested.
    """
    _check_args("causal_conv1d", x, weight, bias, activation, segment_ids, initial_state)
    check_impl("causal_conv1d", impl)
    y = None
    if impl == "cpu" or (impl == "auto" and target_platform() == "cpu"):
        why = native.unsupported(x, weight, bias, segment_ids, initial_state)
        cpu = native.cpu_kernel()
        if why is None and not cpu.available():
            why = f"the native CPU kernel is unavailable: {cpu.unavailable_reason()}"
            if impl == "auto":
                cpu.warn_fallback_once()
        if impl == "cpu" and why is not None:
            raise NotImplementedError(f"causal_conv1d(impl='cpu'): {why}; use impl='xla'")
        if why is None:
            y = native.conv_native(x, weight, bias, activation, initial_state, residual)
    elif impl != "xla":
        y = _pallas_sharded(impl, x, weight, bias, activation, segment_ids, initial_state, residual)
    if y is None:
        y = conv_xla(x, weight, bias, activation, segment_ids, initial_state, residual)
    if return_final_state:
        return y, final_state(x, initial_state, weight.shape[0])
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
