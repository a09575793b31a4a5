"""Hugging Face checkpoint import/export (``LlamaCanon``)."""

from canon_jax.interop.hf import (
    CheckpointError,
    hf_config_from_model_config,
    hf_state_dict_from_params,
    load_hf_checkpoint,
    load_hf_checkpoint_sharded,
    model_config_from_hf,
    params_from_hf_state_dict,
    save_hf_checkpoint,
)

__all__ = [
    "load_hf_checkpoint",
    "load_hf_checkpoint_sharded",
    "save_hf_checkpoint",
    "model_config_from_hf",
    "hf_config_from_model_config",
    "hf_state_dict_from_params",
    "params_from_hf_state_dict",
    "CheckpointError",
]
