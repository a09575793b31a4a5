"""Hugging Face ``LlamaCanon`` checkpoints <-> canon-jax ``CausalLM`` (docs/models.md, "Hugging Face checkpoints").

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Layouts: PyTorch ``Linear`` weights are ``[out, in]`` (Flax ``Dense`` kernels are
``[in, out]``); Canon weights are ``Conv1d`` ``[C, 1, K]`` (ours ``[K, C]``); norms and embeddings are identical.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from canon_jax.config import ModelConfig
from canon_jax.models import CausalLM
from canon_jax.train import sharding as shd

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

MODEL_TYPES = ("LlamaCanon", "llama")

# HF config keys that carry no model math (bookkeeping written by transformers).
_IGNORED_KEYS = {
    "architectures",
    "model_type",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "pretraining_tp",
    "attention_dropout",
    "_name_or_path",
    "partial_rotary_factor",
    "initializer_range",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "rope_scaling",
    "auto_map",
    "_attn_implementation_autoset",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "tie_word_embeddings",
}
_MAPPED_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "rms_norm_eps": "norm_eps",
    "max_position_embeddings": "max_seq_len",
    "rope_theta": "rope_theta",
    "canon_set": "canon_set",
    "canon_kernel": "canon_kernel",
    "canon_residual": "canon_residual",
    "canon_activation": "canon_activation",
    "canon_bias": "canon_bias",
    "qk_norm": "qk_norm",
    "rope_dim": "rope_dim",
    "rope_version": "rope_version",
}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model (missing/unexpected tensor, wrong shape, unsupported option)."""


# --------------------------------------------------------------------------------------------------------------------
# configs


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """``ModelConfig`` (arch ``"llama"``) from a LlamaCanon ``config.json`` dict; ``overrides`` set jax-side fields
    (``dtype``, ``scan_layers``, ``remat``, ``kernel_impl``, ``segment_aware`` ...)."""
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise CheckpointError(f"config.json: unknown model_type {mt!r}; supported: {MODEL_TYPES}")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"config.json: unsupported hidden_act {hf['hidden_act']!r} (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise CheckpointError(f"config.json: unsupported option {key}=true (canon-jax Llama has no biases)")
    if hf.get("rope_scaling") is not None:
        raise CheckpointError(f"config.json: unsupported option rope_scaling={hf['rope_scaling']!r}")
    if hf.get("attention_dropout", 0.0):
        raise CheckpointError(f"config.json: unsupported option attention_dropout={hf['attention_dropout']}")
    unknown = sorted(set(hf) - _IGNORED_KEYS - set(_MAPPED_KEYS))
    if unknown:
        warnings.warn(f"config.json: ignoring keys with no canon-jax meaning: {unknown}", stacklevel=2)
    kw: dict[str, Any] = {
        "arch": "llama",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_scheme": "hf",
        "initializer_range": float(hf.get("initializer_range", 0.02)),
    }
    for src, dst in _MAPPED_KEYS.items():
        if src in hf and hf[src] is not None:
            kw[dst] = hf[src]
    if kw.get("intermediate_size") is None:
        kw["intermediate_size"] = hf["hidden_size"] * 8 // 3  # LlamaCanonMLP default
    kw["rope_theta"] = float(kw.get("rope_theta", 10000.0))
    kw["norm_eps"] = float(kw.get("norm_eps", 1e-6))
    kw.update(overrides)
    return ModelConfig(**kw)


def hf_config_from_model_config(config: ModelConfig) -> dict:
    """The LlamaCanon ``config.json`` dict (field names of the official ``LlamaCanonConfig``) for ``arch="llama"``."""
    if config.arch != "llama":
        raise CheckpointError(
            f"hf_config_from_model_config: only arch='llama' has an HF LlamaCanon form, got {config.arch!r}"
        )
    hf = {
        "architectures": ["LlamaCanonForCausalLM"],
        "model_type": "LlamaCanon",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_dim(),
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "float32",
        "canon_set": config.canon_set,
        "canon_bias": config.canon_bias,
        "canon_activation": config.canon_activation,
        "canon_kernel": config.canon_kernel,
        "canon_residual": config.canon_residual,
        "qk_norm": config.qk_norm,
        "rope_dim": config.rope_dim,
        "rope_version": config.rope_version,
    }
    if config.rope_dim is not None:
        hf["partial_rotary_factor"] = config.rope_dim / config.head_size
    return hf


# --------------------------------------------------------------------------------------------------------------------
# tensors


def _layer_map(config: ModelConfig) -> dict:
    """Per-layer ``hf name -> (path inside our layer, kind)``; kind says how to convert the layout."""
    m = {
        "input_layernorm.weight": (("attn_norm", "scale"), "vec"),
        "post_attention_layernorm.weight": (("mlp_norm", "scale"), "vec"),
        "self_attn.q_proj.weight": (("mixer", "q_proj", "kernel"), "linear"),
        "self_attn.k_proj.weight": (("mixer", "k_proj", "kernel"), "linear"),
        "self_attn.v_proj.weight": (("mixer", "v_proj", "kernel"), "linear"),
        "self_attn.o_proj.weight": (("mixer", "o_proj", "kernel"), "linear"),
        "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), "linear"),
        "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), "linear"),
        "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), "linear"),
    }
    if config.qk_norm:
        m["self_attn.q_norm.weight"] = (("mixer", "q_norm", "scale"), "vec")
        m["self_attn.k_norm.weight"] = (("mixer", "k_norm", "scale"), "vec")
    sites = {
        "A": ("canonA", ("canon_a",)),
        "B": ("self_attn.canonB", ("mixer", "canon_b")),
        "C": ("canonC", ("canon_c",)),
        "D": ("mlp.canonD", ("mlp", "canon_d")),
    }
    for letter, (hf_name, ours) in sites.items():
        if config.has_canon(letter):
            m[f"{hf_name}.weight"] = (ours + ("kernel",), "conv")
            if config.canon_bias:
                m[f"{hf_name}.bias"] = (ours + ("bias",), "vec")
    return m


def _to_ours(t: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return t.T
    if kind == "conv":
        return t[:, 0, :].T
    return t


def _to_hf(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return a.T
    if kind == "conv":
        return a.T[:, None, :]
    return a


def _expected_shapes(config: ModelConfig) -> dict:
    """HF name -> expected HF tensor shape, computed from the config."""

    cfg = config.replace(scan_layers=False)
    shapes = jax.eval_shape(lambda: CausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    flat = flatten_dict(nn.unbox(shapes))
    out = {}
    for hf_name, (path, kind) in _global_map(config).items():
        out[hf_name] = _to_hf(np.empty(flat[path].shape, np.float32), kind).shape
    for i in range(config.num_layers):
        for name, (path, kind) in _layer_map(config).items():
            shape = flat[(f"layers_{i}",) + path].shape
            out[f"model.layers.{i}.{name}"] = _to_hf(np.empty(shape, np.float32), kind).shape
    return out


def _global_map(config: ModelConfig) -> dict:
    m = {
        "model.embed_tokens.weight": (("embed", "embedding"), "vec"),
        "model.norm.weight": (("final_norm", "scale"), "vec"),
    }
    if not config.tie_embeddings:
        m["lm_head.weight"] = (("lm_head", "kernel"), "linear")
    return m


def params_from_hf_state_dict(config: ModelConfig, tensors: dict) -> dict:
    """Flax params (plain arrays, no boxing) for ``CausalLM(config)`` from HF tensors ``name -> np.ndarray``.

    Checks every name and shape; with ``config.scan_layers`` the per-layer params are stacked on a leading axis.
    """
    expected = _expected_shapes(config)
    tensors = dict(tensors)
    if config.tie_embeddings and "lm_head.weight" in tensors:
        # Some writers store the tied head anyway; accept it only if it really is the embedding.
        if not np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
            raise CheckpointError("tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight")
        tensors.pop("lm_head.weight")
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"checkpoint has unexpected/unused tensor(s) {unexpected[:8]} for this config "
            f"(canon_set={config.canon_set!r}, qk_norm={config.qk_norm}, "
            f"tied={config.tie_embeddings})"
        )
    for n, shape in expected.items():
        if tuple(tensors[n].shape) != tuple(shape):
            raise CheckpointError(f"tensor {n}: expected shape {tuple(shape)}, found {tuple(tensors[n].shape)}")
    pdt = np.dtype(jnp.dtype(config.param_dtype))
    flat = {}
    for hf_name, (path, kind) in _global_map(config).items():
        flat[path] = _to_ours(np.asarray(tensors[hf_name]), kind).astype(pdt)
    layers = []
    for i in range(config.num_layers):
        layer = {}
        for name, (path, kind) in _layer_map(config).items():
            layer[path] = _to_ours(np.asarray(tensors[f"model.layers.{i}.{name}"]), kind).astype(pdt)
        layers.append(layer)
    if config.scan_layers:
        for path in layers[0]:
            flat[("layers",) + path] = np.stack([layer[path] for layer in layers])
    else:
        for i, layer in enumerate(layers):
            for path, a in layer.items():
                flat[(f"layers_{i}",) + path] = a
    return unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def hf_state_dict_from_params(config: ModelConfig, params) -> dict:
    """HF tensors ``name -> float32 np.ndarray`` from (boxed or plain) ``CausalLM(config)`` params."""
    flat = flatten_dict(nn.unbox(params))
    out = {}
    for hf_name, (path, kind) in _global_map(config).items():
        # safetensors writes the raw buffer: a transposed view must be made contiguous first
        out[hf_name] = np.ascontiguousarray(_to_hf(np.asarray(flat[path], np.float32), kind))
    for i in range(config.num_layers):
        for name, (path, kind) in _layer_map(config).items():
            a = flat[("layers",) + path][i] if config.scan_layers else flat[(f"layers_{i}",) + path]
            out[f"model.layers.{i}.{name}"] = np.ascontiguousarray(_to_hf(np.asarray(a, np.float32), kind))
    return out


# --------------------------------------------------------------------------------------------------------------------
# files


def _load_safetensors(file: str) -> dict:
    from safetensors.numpy import load_file

    try:
        return load_file(file)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointError(f"{file}: unreadable safetensors file ({type(e).__name__}: {e})") from None


def _load_json(file: str):
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable JSON ({type(e).__name__}: {e})") from None


def _read_tensors(path: str) -> dict:
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return _load_safetensors(single)
    if os.path.exists(index):
        weight_map = _load_json(index)
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise CheckpointError(f"{index}: no 'weight_map' mapping")
        weight_map = weight_map["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            part = _load_safetensors(os.path.join(path, shard))
            for name, t in part.items():
                if weight_map.get(name) != shard:
                    raise CheckpointError(
                        f"tensor {name} found in shard {shard} but the index maps it to {weight_map.get(name)!r}"
                    )
                tensors[name] = t
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"index lists tensor(s) {absent[:8]} that no shard contains")
        return tensors
    raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")


def load_hf_checkpoint(path: str, **config_overrides):
    """Loads a LlamaCanon directory -> ``(CausalLM, params)`` (params as plain float arrays, no boxing).

    ``config_overrides`` set jax-side ``ModelConfig`` fields (e.g. ``scan_layers=True``, ``dtype="bfloat16"``).
    """

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: config.json not found")
    hf = _load_json(cfg_path)
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(hf).__name__}")
    config = model_config_from_hf(hf, **config_overrides)
    params = params_from_hf_state_dict(config, _read_tensors(path))
    return CausalLM(config), params


def save_hf_checkpoint(model, params, path: str) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (float32, HF names/layouts) for a Llama ``CausalLM``."""
    from safetensors.numpy import save_file

    config = model.config
    hf = hf_config_from_model_config(config)
    os.makedirs(path, exist_ok=True)
    tensors = hf_state_dict_from_params(config, params)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------------------------------
# sharded loading: every device's slice read straight from the safetensors files


class _SliceReader:
    """Reads ``tensor[slices]`` of HF tensors from a checkpoint directory (one file or index + shards), opening each
    shard lazily and reading only the requested slice (safetensors ``get_slice``; the file is memory-mapped, so the
    bytes of other slices are never touched)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self._open = safe_open
        self.path = path
        single = os.path.join(path, "model.safetensors")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                self.weight_map = dict(json.load(f)["weight_map"])
            for shard in sorted(set(self.weight_map.values())):
                if not os.path.exists(os.path.join(path, shard)):
                    raise CheckpointError(f"{path}: shard {shard} listed in model.safetensors.index.json is missing")
        elif os.path.exists(single):
            with safe_open(single, framework="numpy") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
        self._files: dict = {}

    def _file(self, name: str):
        shard = self.weight_map[name]
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = self._open(os.path.join(self.path, shard), framework="numpy")
        return f

    def shape(self, name: str) -> tuple:
        return tuple(self.read_slice_object(name).get_shape())

    def read_slice_object(self, name: str):
        f = self._file(name)
        try:
            return f.get_slice(name)
        except Exception:  # safetensors raises its own error type for an absent name
            raise CheckpointError(
                f"tensor {name}: not in shard {self.weight_map[name]} although the index maps it there"
            ) from None

    def read(self, name: str, slices: tuple) -> np.ndarray:
        return np.asarray(self.read_slice_object(name)[slices])


def _hf_slices(kind: str, idx: tuple) -> tuple:
    """The HF-layout slices holding our-layout slice ``idx`` (see ``_to_ours``)."""
    if kind == "linear":  # ours [in, out] = hf[out, in].T
        return (idx[1], idx[0])
    if kind == "conv":  # ours [K, C] = hf[C, 1, K][:, 0, :].T
        return (idx[1], slice(0, 1), idx[0])
    return idx


def load_hf_checkpoint_sharded(path: str, mesh, *, rules=None, **config_overrides):
    """Loads a LlamaCanon directory straight onto ``mesh`` -> ``(CausalLM, params)`` with params as global
    ``jax.Array``s laid out by the logical-axis rules (:mod:`canon_jax.train.sharding`).

    Each parameter is built with ``jax.make_array_from_callback``: the callback of every addressable device reads
    only that device's slice from the safetensors shards, so no host ever holds a full copy of the model (an 8B
    checkpoint loads onto a pod with each host reading only the shards its devices need).
    """

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: config.json not found")
    with open(cfg_path) as f:
        config = model_config_from_hf(json.load(f), **config_overrides)
    reader = _SliceReader(path)
    expected = _expected_shapes(config)
    names = set(reader.weight_map)
    if config.tie_embeddings and "lm_head.weight" in names:
        warnings.warn(
            f"{path}: tie_word_embeddings=true; the stored lm_head.weight is not read (the head is the embedding)",
            stacklevel=2,
        )
        names.discard("lm_head.weight")
    missing = [n for n in expected if n not in names]
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(names - set(expected))
    if unexpected:
        raise CheckpointError(
            f"checkpoint has unexpected/unused tensor(s) {unexpected[:8]} for this config "
            f"(canon_set={config.canon_set!r}, qk_norm={config.qk_norm}, "
            f"tied={config.tie_embeddings})"
        )
    for n, shape in expected.items():
        if reader.shape(n) != tuple(shape):
            raise CheckpointError(f"tensor {n}: expected shape {tuple(shape)}, found {reader.shape(n)}")

    model = CausalLM(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    shardings = flatten_dict(shd.logical_shardings(boxed, mesh, rules or shd.LOGICAL_RULES))
    shapes = flatten_dict(nn.meta.unbox(boxed))
    pdt = np.dtype(jnp.dtype(config.param_dtype))
    sources = {}  # our path -> (kind, [hf names]) ; several names = stacked layers (scan_layers)
    for hf_name, (p, kind) in _global_map(config).items():
        sources[p] = (kind, [hf_name])
    for name, (p, kind) in _layer_map(config).items():
        layer_names = [f"model.layers.{i}.{name}" for i in range(config.num_layers)]
        if config.scan_layers:
            sources[("layers",) + p] = (kind, layer_names)
        else:
            for i, n in enumerate(layer_names):
                sources[(f"layers_{i}",) + p] = (kind, [n])

    def callback(kind, hf_names, stacked, shape):
        def read(idx):
            idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
            if not stacked:
                return _to_ours(reader.read(hf_names[0], _hf_slices(kind, idx)), kind).astype(pdt)
            layers = range(*idx[0].indices(len(hf_names)))
            return np.stack(
                [_to_ours(reader.read(hf_names[i], _hf_slices(kind, idx[1:])), kind).astype(pdt) for i in layers]
            )

        return read

    flat = {}
    for p, (kind, hf_names) in sources.items():
        shape = shapes[p].shape
        flat[p] = jax.make_array_from_callback(
            shape, shardings[p], callback(kind, hf_names, config.scan_layers and p[0] == "layers", shape)
        )
    return model, unflatten_dict(flat)
