"""Depthwise causal 1-D convolution over time, the math of a Canon layer: ``pallas_kernels.short_conv.api``."""

from pallas_kernels.short_conv.api import causal_conv1d, causal_conv1d_step

__all__ = ["causal_conv1d", "causal_conv1d_step"]
