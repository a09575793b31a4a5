"""Hand-written Pallas kernels (Mosaic TPU and Mosaic GPU).

Each op folder holds its reference, kernels, custom VJP and api: ``short_conv/``, ``linear_scan/``.
"""
