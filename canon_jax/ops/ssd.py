"""Mamba2's state-space duality (SSD) scan: ``pallas_kernels.linear_scan.api``."""

from pallas_kernels.linear_scan.api import ssd, ssd_step

__all__ = ["ssd", "ssd_step"]
