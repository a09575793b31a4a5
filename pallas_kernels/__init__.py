"""The ops of the model's sequence mixers with their kernels (Mosaic TPU and Mosaic GPU Pallas kernels).

Each op folder holds the whole op: ``api.py`` (the ``impl=`` switch and the argument checks), the XLA path, the
Pallas kernels with their custom VJPs, and the references: ``short_conv/`` (the Canon conv) and ``linear_scan/``
(GLA, Gated DeltaNet, Mamba2 SSD). ``common.py`` has the implementation names, the target-platform detection and the
block sizes; ``sharding.py`` runs a per-device call under ``shard_map`` on a mesh; ``cost.py`` the kernels' cost
estimates.
"""
