"""Training FLOPs per token and model-FLOPs utilisation (MFU).

Formula (PaLM appendix B convention; forward = 1/3, backward = 2/3 of the work):

    flops_per_token = 6 * N_matmul + 12 * n_layers * d_attn * T      (llama)
    flops_per_token = 6 * N_matmul                                     (gla / gdn / mamba2)

* ``N_matmul`` = all parameters except the input embedding table (a lookup, no FLOPs); with tied embeddings the
  table is counted once, as the output head. Canon convs are included: each of the K*C weights does one
  multiply-add per token, exactly like a matmul weight.
* ``12 * L * d_attn * T``: the QK^T and PV products, forward+backward, with ``d_attn = num_heads * head_dim`` and
  ``T`` the training sequence length. Causal masking is *not* halved (PaLM convention), so MFU is comparable with
  published numbers.
* Linear models' chunked scans (intra-chunk quadratic terms, state updates) are not counted: their MFU is a lower
  bound.

MFU = achieved FLOPs/s / (num_devices * peak FLOPs/s per device). Peak values below are dense bf16 datasheet numbers.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["count_params", "flops_per_token", "peak_flops_per_device", "PEAK_FLOPS_BF16"]

PEAK_FLOPS_BF16 = {
    "H100": 989.4e12,
    "H200": 989.4e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def count_params(params) -> int:
    """Total number of scalars in a (possibly boxed) parameter tree."""
    leaves = jax.tree.leaves(params)
    return int(sum(int(np.prod(x.shape)) for x in leaves))


def flops_per_token(model_config, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) for ``model_config`` with ``n_params`` parameters."""
    c = model_config
    n_matmul = n_params if c.tie_embeddings else n_params - c.vocab_size * c.hidden_size
    flops = 6.0 * n_matmul
    if c.arch == "llama":
        flops += 12.0 * c.num_layers * c.num_heads * c.head_size * seq_len
    return flops


def peak_flops_per_device(device=None) -> float | None:
    """Datasheet dense bf16 peak of a known accelerator, or None (e.g. CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    for name, peak in PEAK_FLOPS_BF16.items():
        if name.lower() in kind.lower():
            return peak
    return None
