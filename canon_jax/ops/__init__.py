"""Math with one signature and several implementations (XLA reference/chunked paths, Pallas kernels).

``causal_conv1d`` (the Canon conv), ``gla`` (gated linear attention), ``gated_delta_rule`` (GDN) and ``ssd``
(Mamba2) each take ``impl=`` in {"auto", "xla", "pallas", "pallas_interpret"}.
"""
from __future__ import annotations

import importlib

from canon_jax.ops.conv import causal_conv1d, causal_conv1d_step

_LAZY = {
    "gla": "canon_jax.ops.gla",
    "gla_step": "canon_jax.ops.gla",
    "gated_delta_rule": "canon_jax.ops.gdn",
    "gated_delta_rule_step": "canon_jax.ops.gdn",
    "ssd": "canon_jax.ops.ssd",
    "ssd_step": "canon_jax.ops.ssd",
}

__all__ = ["causal_conv1d", "causal_conv1d_step"] + sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'canon_jax.ops' has no attribute {name!r}")
