"""Math with one signature and several implementations (XLA reference/chunked paths, Pallas kernels).

``causal_conv1d`` (the Canon conv), ``gla`` (gated linear attention), ``gated_delta_rule`` (GDN) and ``ssd``
(Mamba2) each take ``impl=`` in {"auto", "xla", "pallas", "pallas_interpret"}; the three linear recurrences also take
``"reference"`` (a token-by-token ``lax.scan``; ``"xla"`` is their chunked form).
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
