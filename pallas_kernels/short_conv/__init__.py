"""Short (depthwise causal) convolution: the op (``api.causal_conv1d``), its XLA and native CPU paths, the Mosaic TPU
and Mosaic GPU kernels with their custom VJP, and a float64 reference."""

from pallas_kernels.short_conv.api import causal_conv1d, causal_conv1d_step, short_conv, supports
from pallas_kernels.short_conv.reference import short_conv_reference

__all__ = ["causal_conv1d", "causal_conv1d_step", "short_conv", "supports", "short_conv_reference"]
