"""Gated delta rule (Gated DeltaNet): ``pallas_kernels.linear_scan.api``."""

from pallas_kernels.linear_scan.api import gated_delta_rule, gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_step"]
