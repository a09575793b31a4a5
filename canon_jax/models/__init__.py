"""Causal LMs assembled from a :class:`canon_jax.config.ModelConfig`."""

from canon_jax.models.blocks import Block
from canon_jax.models.causal_lm import CausalLM, init_cache
from canon_jax.models.registry import get_mixer, register_mixer, registered_mixers

__all__ = ["CausalLM", "init_cache", "Block", "get_mixer", "register_mixer", "registered_mixers"]
