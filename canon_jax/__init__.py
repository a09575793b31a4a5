"""canon-jax: Canon layers (Physics of Language Models, Part 4.1) and the models around them, in JAX/Flax Linen.

Top-level names are imported lazily so that ``import canon_jax`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "canon_jax.config",
    "Canon": "canon_jax.layers.canon",
    "CausalLM": "canon_jax.models",
    "generate": "canon_jax.generate",
    "load_hf_checkpoint": "canon_jax.interop",
    "save_hf_checkpoint": "canon_jax.interop",
    "load_run": "canon_jax.train.export",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'canon_jax' has no attribute {name!r}")
