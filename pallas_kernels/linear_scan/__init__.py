"""The linear recurrences: the ops with their ``impl=`` switch (``api``: GLA, Gated DeltaNet, Mamba2 SSD), their XLA
forms (``gla_xla``, ``gdn_xla``, ``ssd_xla``), the Pallas scan kernels (GLA vector gates, SSD scalar gates; TPU:
``tpu`` + ``op``, Mosaic GPU: ``gpu*``) and float64 references. The names below are the kernel entry points
(``kernel``), called with ``interpret=`` / ``backend=``."""

from pallas_kernels.linear_scan.kernel import gla, gla_gpu_gates_ok, ssd, supports
from pallas_kernels.linear_scan.reference import gla_reference, ssd_reference

__all__ = ["gla", "gla_gpu_gates_ok", "ssd", "supports", "gla_reference", "ssd_reference"]
