"""Building blocks shared by the linear mixers (GLA5, GDN2, Mamba2; SPEC A.3).

* :class:`LowRankLinear`: ``x -> (x W_down) W_up (+ b)``, the rank-16 forget / output gates, with
  ``zeyuan_split_init`` (each factor ~ N(0, sqrt(initializer_range) / rank**0.25), so the product has entry std
  ~ initializer_range).
* :class:`ShortConv`: a depthwise causal conv ("Canon-b": the architecture's own short conv; or a residual Canon-B)
  with a ``"cache"`` state for decoding and a configurable bias init (Mamba2's conv1d has a PyTorch-default bias).
* initialisers, per-head RMSNorm, token-mask helpers, the recurrent-state cache helper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from canon_jax.ops import linear
from canon_jax.ops.conv import causal_conv1d, causal_conv1d_step

__all__ = [
    "LowRankLinear",
    "ShortConv",
    "normal_init",
    "torch_default_init",
    "rms_norm",
    "mask_tokens",
    "compute_dtype",
    "recurrent_cache",
    "LINEAR_CANON_PRESETS",
    "normalize_canon_set",
]

# Recipe names of the canon_set (SPEC A.3): the official spelling doubles "b" ("bb", "AbbCD") only to tell the files
# apart from "ABCD" on case-insensitive file systems; it means the same as a single "b".
LINEAR_CANON_PRESETS = {"conv": "b", "Canon": "AbCD"}


def normalize_canon_set(canon_set: str) -> str:
    """Maps a preset name (``"conv"``, ``"Canon"``) or an official spelling (``"bb"``, ``"AbbCD"``) to the letters,
    each once, in their original order: ``"AbbCD" -> "AbCD"``."""
    canon_set = LINEAR_CANON_PRESETS.get(canon_set, canon_set)
    return "".join(dict.fromkeys(canon_set))


def normal_init(std: float):
    return nn.initializers.normal(stddev=std)


def torch_default_init(fan_in: int):
    """PyTorch ``nn.Linear`` / ``nn.Conv1d`` default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def compute_dtype(name: str):
    return jnp.dtype(name)


def rms_norm(x, weight, eps):
    """``x * rsqrt(mean(x**2, -1) + eps) * weight`` computed in float32, returned in float32."""
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * weight.astype(jnp.float32)


def mask_tokens(x, token_mask):
    """Zeroes ``x: [batch, time, ...]`` where ``token_mask: [batch, time]`` is False (None = all valid)."""
    if token_mask is None:
        return x
    m = token_mask.reshape(token_mask.shape + (1,) * (x.ndim - 2))
    return jnp.where(m, x, jnp.zeros((), x.dtype))


class LowRankLinear(nn.Module):
    """``[..., in] -> [..., features]`` through a rank-``rank`` bottleneck: ``(x @ down) @ up + bias``."""

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


class ShortConv(nn.Module):
    """Depthwise causal conv on ``x: [batch, time, channels]`` (weight ``[K, channels]``, last tap = current token).

    ``y = act(conv(x) + bias)`` (+ ``x`` if ``residual``). ``identity=True`` replaces the kernel by the identity
    kernel ``[0, .., 0, 1]`` and creates no parameter (Mamba2's ``noconv1d`` ablation). With ``decode=True`` the last
    ``K`` raw inputs are kept in the ``"cache"`` collection (``state: [batch, channels, K]``).
    """

    kernel_size: int = 4
    residual: bool = False
    activation: str | None = "silu"
    use_bias: bool = False
    channel_axis: str = "qkv"
    kernel_init: Callable[..., Any] = normal_init(0.02)
    bias_init: Callable[..., Any] = nn.initializers.zeros_init()
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, *, segment_ids=None, decode: bool = False):
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
                nn.with_logical_partitioning(self.bias_init, (self.channel_axis,)),
                (channels,),
                self.param_dtype,
            )
        kw = dict(bias=bias, activation=self.activation, residual=self.residual)
        if not decode:  # named for the remat policies (canon_jax.models.causal_lm.REMAT_POLICIES)
            return checkpoint_name(causal_conv1d(x, weight, segment_ids=segment_ids, impl=self.impl, **kw), "canon")
        is_init = not self.has_variable("cache", "state")
        state = self.variable("cache", "state", jnp.zeros, (x.shape[0], channels, self.kernel_size), x.dtype)
        if is_init:
            return causal_conv1d(x, weight, segment_ids=segment_ids, impl=self.impl, **kw)
        if x.shape[1] == 1 and segment_ids is None:
            y, new_state = causal_conv1d_step(x[:, 0], state.value, weight, **kw)
            y = y[:, None]
        else:
            y, new_state = causal_conv1d(
                x,
                weight,
                segment_ids=segment_ids,
                initial_state=state.value,
                return_final_state=True,
                impl=self.impl,
                **kw,
            )
        state.value = new_state
        return y


def recurrent_cache(module: nn.Module, shape, decode: bool):
    """``(variable, is_init)`` for the recurrent state of a mixer in the ``"cache"`` collection (float32), or
    ``(None, True)`` when not decoding. ``is_init`` is True while the cache is being created (``model.init``): the
    state must then be neither read nor written."""
    if not decode:
        return None, True
    is_init = not module.has_variable("cache", "recurrent_state")
    var = module.variable("cache", "recurrent_state", jnp.zeros, shape, jnp.float32)
    return var, is_init
