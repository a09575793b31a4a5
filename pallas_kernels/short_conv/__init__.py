"""Short (depthwise causal) convolution kernels: Mosaic TPU, Mosaic GPU, custom VJP, float64 reference."""

from pallas_kernels.short_conv.api import short_conv, supports
from pallas_kernels.short_conv.reference import short_conv_reference

__all__ = ["short_conv", "supports", "short_conv_reference"]
