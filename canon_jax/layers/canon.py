"""The Canon layer: a residual depthwise causal convolution over time (SPEC A.1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from canon_jax.ops.conv import causal_conv1d

__all__ = ["Canon", "canon_kernel_init"]


def canon_kernel_init(key, shape, dtype=jnp.float32):
    """PyTorch ``Conv1d`` default for a depthwise conv: U(-1/sqrt(K), 1/sqrt(K)) with ``shape = [K, channels]``."""
    bound = 1.0 / (shape[0] ** 0.5)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Canon(nn.Module):
    """Canon layer on ``x: [batch, time, channels]``.

    ``y = x + conv(x)`` (``residual``), optionally ``conv`` followed by SiLU (``activation="silu"``) and a bias
    (initialised to zero). The weight is ``[kernel_size, channels]`` with the last tap on the current token.

    Decoding: call with ``decode=True`` and a mutable ``"cache"`` collection. The cache variable ``state``
    (``[batch, channels, K]``, last K raw inputs) is read as the history and updated, so one call can prefill any
    number of tokens and later calls step one (or several) tokens at a time.
    """

    kernel_size: int = 4
    residual: bool = True
    activation: str | None = None
    use_bias: bool = False
    channel_axis: str = "embed"
    kernel_init: Callable[..., Any] = canon_kernel_init
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, *, segment_ids=None, decode: bool = False):
        if self.kernel_size < 1:
            raise ValueError(f"Canon: kernel_size must be >= 1, got {self.kernel_size}")
        channels = x.shape[-1]
        weight = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, ("conv_kernel", self.channel_axis)),
            (self.kernel_size, channels),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.channel_axis,)),
                (channels,),
                self.param_dtype,
            )
        if not decode:  # named for the remat policies (canon_jax.models.causal_lm.REMAT_POLICIES)
            return checkpoint_name(
                causal_conv1d(
                    x,
                    weight,
                    bias=bias,
                    activation=self.activation,
                    segment_ids=segment_ids,
                    residual=self.residual,
                    impl=self.impl,
                ),
                "canon",
            )
        is_init = not self.has_variable("cache", "state")
        state = self.variable("cache", "state", jnp.zeros, (x.shape[0], channels, self.kernel_size), x.dtype)
        y, new_state = causal_conv1d(
            x,
            weight,
            bias=bias,
            activation=self.activation,
            segment_ids=segment_ids,
            initial_state=None if is_init else state.value,
            return_final_state=True,
            residual=self.residual,
            impl=self.impl,
        )
        if not is_init:
            state.value = new_state
        return y
