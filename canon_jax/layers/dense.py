"""Projections shared by every layer: :func:`dense`, raw weights (:class:`Kernel`, :func:`fused_projection`), the
low-rank gates of the linear mixers (:class:`LowRankLinear`), and the compute dtype."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from canon_jax.config import ModelConfig
from canon_jax.layers.init import normal_init
from canon_jax.ops import linear

__all__ = ["compute_dtype", "dense", "Kernel", "fused_projection", "LowRankLinear"]


def compute_dtype(config: ModelConfig):
    """The dtype activations and matmul operands are computed in (parameters stay in ``config.param_dtype``)."""
    return jnp.dtype(config.dtype)


def dense(config: ModelConfig, features: int, axes: tuple, name: str, *, init: Callable[..., Any]) -> nn.Dense:
    """A bias-free ``nn.Dense`` in the config's compute and parameter dtypes, with logical ``axes`` (input, output)
    on its kernel, initialiser ``init``, and the matmul of :mod:`canon_jax.ops.linear`."""
    return nn.Dense(
        features,
        use_bias=False,
        dtype=compute_dtype(config),
        param_dtype=jnp.dtype(config.param_dtype),
        dot_general=linear.dot_general,
        kernel_init=nn.with_logical_partitioning(init, axes),
        name=name,
    )


class Kernel(nn.Module):
    """Holds one projection weight ``kernel: [in, out]`` (same param path as ``nn.Dense(name=...)``) and returns it.

    Lets a layer use the raw weight, e.g. split the fused ``both_proj`` into its gate and up halves so that each half
    is its own GEMM feeding a split-input Canon (no ``[batch, time, 2 * ffn]`` activation to slice).
    """

    shape: tuple
    axes: tuple
    init: Any
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param("kernel", nn.with_logical_partitioning(self.init, self.axes), self.shape, self.param_dtype)


def fused_projection(x, kernels, dtype):
    """``x: [..., in]`` times ``concat(kernels, axis=1)`` -> ``[..., sum(out)]`` in ``dtype`` (one GEMM, with the
    hand-written VJP of ``canon_jax.ops.linear.matmul``)."""
    w = kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=1)
    return linear.matmul(x.astype(dtype), w.astype(dtype))


class LowRankLinear(nn.Module):
    """``[..., in] -> [..., features]`` through a rank-``rank`` bottleneck: ``(x @ down) @ up + bias``.

    The rank-16 forget / output gates of GLA5 and GDN2. ``factor_std`` is the std of both factors; the official
    ``zeyuan_split_init`` uses ``sqrt(initializer_range) / rank**0.25`` so that the product has entry std
    ~ ``initializer_range``.
    """

    features: int
    rank: int
    axes: tuple = ("embed", "value")  # logical axes of (input, output)
    use_bias: bool = True
    factor_std: float = 0.02**0.5 / 16**0.25
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = normal_init(self.factor_std)
        down = self.param(
            "down",
            nn.with_logical_partitioning(init, (self.axes[0], "low_rank")),
            (x.shape[-1], self.rank),
            self.param_dtype,
        )
        up = self.param(
            "up",
            nn.with_logical_partitioning(init, ("low_rank", self.axes[1])),
            (self.rank, self.features),
            self.param_dtype,
        )
        y = linear.matmul(linear.matmul(x.astype(self.dtype), down.astype(self.dtype)), up.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y
