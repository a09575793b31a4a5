"""Hand-written Pallas kernels (Mosaic TPU and Mosaic GPU); each op folder holds its reference, kernels, custom VJP and api."""
