"""Pieces shared by the linear-recurrence mixers (GLA5, GDN2, Mamba2): the call checks and the decode cache of the
recurrent state."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from canon_jax.config import ModelConfig

__all__ = ["check_linear_call", "recurrent_cache"]


def check_linear_call(cfg: ModelConfig, x, segment_ids, name: str):
    """Rejects an input of the wrong width, and segment-aware packing (the recurrences carry their state across
    document boundaries: the state is not reset at a new segment)."""
    if x.ndim != 3 or x.shape[-1] != cfg.hidden_size:
        raise ValueError(f"{name}: x must be [batch, time, hidden_size={cfg.hidden_size}], got {x.shape}")
    if cfg.segment_aware and segment_ids is not None:
        raise NotImplementedError(
            f"{name}: segment_aware=True would need the recurrent state reset at document starts, which the linear "
            "mixers do not implement; use segment_aware=False (the default: run across boundaries)"
        )


def recurrent_cache(module: nn.Module, shape, decode: bool):
    """``(variable, is_init)`` for the recurrent state of a mixer in the ``"cache"`` collection (float32), or
    ``(None, True)`` when not decoding. ``is_init`` is True while the cache is being created (``model.init``): the
    state must then be neither read nor written."""
    if not decode:
        return None, True
    is_init = not module.has_variable("cache", "recurrent_state")
    var = module.variable("cache", "recurrent_state", jnp.zeros, shape, jnp.float32)
    return var, is_init
