"""Gated linear attention (GLA): ``pallas_kernels.linear_scan.api``."""

from pallas_kernels.linear_scan.api import gla, gla_step

__all__ = ["gla", "gla_step"]
