"""Flax Linen layers, one concept per file: ``canon`` (every Canon layer), ``attention``, ``mlp``, the linear mixers
``gla``/``gdn``/``mamba2`` (with ``recurrent``), and the shared ``dense``, ``init``, ``masking``, ``norm``, ``rope``."""

from canon_jax.layers.canon import Canon, canon_from_config
from canon_jax.layers.init import canon_kernel_init

__all__ = ["Canon", "canon_from_config", "canon_kernel_init"]
