"""Gated SwiGLU MLP with the optional Canon-D (SPEC A.2), and the weight initialisers shared by the Llama layers."""
from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from canon_jax.config import ModelConfig
from canon_jax.layers.canon import Canon

__all__ = ["MLP", "weight_init", "make_canon", "compute_dtype"]


def compute_dtype(config: ModelConfig):
    return jnp.dtype(config.dtype)


def weight_init(config: ModelConfig, fan: int):
    """Initialiser of a projection / embedding (SPEC A.2).

    ``init_scheme="lingua"``: truncated normal with std ``fan^-1/2`` cut at +-3 std (``fan`` = d for q/k/v/o/w1/w3,
    embedding and head; ffn width for w2). ``"hf"``: N(0, ``initializer_range``) for everything.
    """
    if config.init_scheme == "hf":
        return nn.initializers.normal(config.initializer_range)
    return nn.initializers.truncated_normal(fan ** -0.5, lower=-3.0, upper=3.0)


def make_canon(config: ModelConfig, channel_axis: str, name: str) -> Canon:
    """A Canon layer with the config's kernel size, residual, activation, bias and kernel implementation."""
    return Canon(kernel_size=config.canon_kernel, residual=config.canon_residual,
                 activation="silu" if config.canon_activation else None, use_bias=config.canon_bias,
                 channel_axis=channel_axis, param_dtype=jnp.dtype(config.param_dtype), impl=config.kernel_impl,
                 name=name)


def mask_inputs(x, token_mask):
    """Zeroes ``x: [batch, time, ...]`` where ``token_mask: [batch, time]`` is False (no-op when it is None)."""
    if token_mask is None:
        return x
    return x * token_mask.reshape(token_mask.shape + (1,) * (x.ndim - 2)).astype(x.dtype)


class MLP(nn.Module):
    """``out = W2(SiLU(g) * u)`` with ``g = W1 x``, ``u = W3 x`` and Canon-D on ``concat(g, u)`` when enabled.

    ``x: [batch, time, d]`` -> ``[batch, time, d]``. ``fused=False`` keeps separate ``gate_proj``/``up_proj``
    (Hugging Face Llama names); ``fused=True`` uses one ``both_proj`` of width ``2 * ffn`` (the linear models' layout).
    Same math either way.
    """

    config: ModelConfig
    fused: bool = False

    @nn.compact
    def __call__(self, x, *, segment_ids=None, token_mask=None, decode: bool = False):
        cfg = self.config
        d, f = cfg.hidden_size, cfg.ffn_dim()
        dt, pdt = compute_dtype(cfg), jnp.dtype(cfg.param_dtype)

        def dense(features, axes, fan, name):
            return nn.Dense(features, use_bias=False, dtype=dt, param_dtype=pdt,
                            kernel_init=nn.with_logical_partitioning(weight_init(cfg, fan), axes), name=name)

        if self.fused:
            gu = dense(2 * f, ("embed", "mlp"), d, "both_proj")(x)
        else:
            gu = jnp.concatenate([dense(f, ("embed", "mlp"), d, "gate_proj")(x),
                                  dense(f, ("embed", "mlp"), d, "up_proj")(x)], axis=-1)
        gu = nn.with_logical_constraint(gu, ("batch", "length", "mlp"))
        if cfg.has_canon("D"):
            seg = segment_ids if cfg.segment_aware else None
            gu = make_canon(cfg, "mlp", "canon_d")(mask_inputs(gu, token_mask), segment_ids=seg, decode=decode)
        g, u = gu[..., :f], gu[..., f:]
        h = nn.silu(g) * u
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense(d, ("mlp", "embed"), f, "down_proj")(h)
