"""Chunked gated linear-attention scan kernels (GLA vector gates, Mamba2 SSD scalar gates) with float64 references."""

from pallas_kernels.linear_scan.api import gla, gla_gpu_gates_ok, ssd, supports
from pallas_kernels.linear_scan.reference import gla_reference, ssd_reference

__all__ = ["gla", "gla_gpu_gates_ok", "ssd", "supports", "gla_reference", "ssd_reference"]
