"""The model's ops, each with one ``impl=`` switch (``pallas_kernels.common.IMPLEMENTATIONS``).

``causal_conv1d`` (the Canon conv; ``pallas_kernels.short_conv.api``), ``gla`` (gated linear attention),
``gated_delta_rule`` (GDN) and ``ssd`` (Mamba2) (``pallas_kernels.linear_scan.api``) live with their kernels and are
re-exported here; ``attention`` (JAX's splash / cuDNN flash attention), ``linear`` (the projections' matmul) and
``cpu`` (the native XLA:CPU conv kernel) are this package's own.
"""

from __future__ import annotations

from canon_jax.ops.conv import causal_conv1d, causal_conv1d_step

# Imported eagerly: the functions share their modules' names, so a lazy lookup would be shadowed by the submodule
# attribute as soon as anything imports ``canon_jax.ops.gla`` directly.
from canon_jax.ops.gdn import gated_delta_rule, gated_delta_rule_step
from canon_jax.ops.gla import gla, gla_step
from canon_jax.ops.ssd import ssd, ssd_step

__all__ = [
    "causal_conv1d",
    "causal_conv1d_step",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "gla",
    "gla_step",
    "ssd",
    "ssd_step",
]
