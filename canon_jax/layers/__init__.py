"""Flax Linen layers, one concept per file."""

from canon_jax.layers.canon import Canon, canon_kernel_init

__all__ = ["Canon", "canon_kernel_init"]
