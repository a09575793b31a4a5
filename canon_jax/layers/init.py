"""Parameter initialisers of every layer.

The Llama layers, the embedding and the head follow ``config.resolved_init_scheme`` (:func:`weight_init`,
:func:`embedding_init`); the linear mixers use the inits of their official implementations (fla / mamba_ssm):
:func:`normal_init`, :func:`torch_default_init`, :func:`a_log_init`, :func:`dt_bias_init`. Canon kernels use
PyTorch's ``Conv1d`` default (:func:`canon_kernel_init`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from canon_jax.config import ModelConfig

__all__ = [
    "canon_kernel_init",
    "normal_init",
    "torch_default_init",
    "weight_init",
    "embedding_init",
    "a_log_init",
    "dt_bias_init",
]


def canon_kernel_init(key, shape, dtype=jnp.float32):
    """PyTorch ``Conv1d`` default for a depthwise conv: U(-1/sqrt(K), 1/sqrt(K)) with ``shape = [K, channels]``."""
    bound = 1.0 / (shape[0] ** 0.5)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def normal_init(std: float):
    """N(0, ``std``)."""
    return nn.initializers.normal(stddev=std)


def torch_default_init(fan_in: int):
    """PyTorch ``nn.Linear`` / ``nn.Conv1d`` default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def weight_init(config: ModelConfig, fan: int):
    """Initialiser of a projection (``fan`` = its fan-in) or of the embedding/head (``fan`` = d).

    By ``config.resolved_init_scheme``: ``"lingua"`` truncated normal with std ``fan^-1/2`` cut at +-3 std;
    ``"hf"`` N(0, ``init_std``); ``"torch"`` PyTorch's ``nn.Linear`` default U(-fan^-1/2, fan^-1/2).
    """
    scheme = config.resolved_init_scheme
    if scheme == "hf":
        return nn.initializers.normal(config.init_std)
    if scheme == "torch":
        return torch_default_init(fan)
    return nn.initializers.truncated_normal(fan**-0.5, lower=-3.0, upper=3.0)


def embedding_init(config: ModelConfig):
    """Token-embedding initialiser: lingua trunc-normal d^-1/2, else N(0, ``init_std``) (HF classes: 0.02 for
    GLA5/GDN2 and Llama, 0.1 for Mamba2)."""
    if config.resolved_init_scheme == "lingua":
        return weight_init(config, config.hidden_size)
    return nn.initializers.normal(config.init_std)


def a_log_init(low: float, high: float):
    """``log(U(low, high))`` per head (``A = exp(A_log)`` is the decay rate)."""

    def init(key, shape, dtype=jnp.float32):
        # U(0, 16) can return exactly 0 with vanishing probability; keep log finite
        a = jax.random.uniform(key, shape, jnp.float32, low, high)
        return jnp.log(jnp.maximum(a, 1e-6)).astype(dtype)

    return init


def dt_bias_init(dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4):
    """``softplus^-1(dt)`` with ``dt`` log-uniform in ``[dt_min, dt_max]``, floored at ``floor`` (Mamba2/GDN)."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init
