"""CausalLM options: scan/remat, bf16, init schemes, segment-aware packing, logical axes, errors, mixer registry."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.config import ModelConfig
from canon_jax.interop import hf_state_dict_from_params, params_from_hf_state_dict
from canon_jax.models import CausalLM, registry
from tests.models.helpers import random_params

BASE = dict(
    vocab_size=37,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    canon_set="ABCD",
    qk_norm=True,
    rope_dim=4,
)
IDS = np.random.default_rng(0).integers(0, 37, size=(2, 13)).astype(np.int32)


def test_scan_and_remat_match_plain():
    plain = ModelConfig(**BASE)
    params = random_params(CausalLM(plain), 0)
    ref = jax.jit(CausalLM(plain).apply)({"params": params}, IDS)
    chex.assert_shape(ref, (2, 13, 37))
    sd = hf_state_dict_from_params(plain, params)
    for kw in (dict(scan_layers=True, remat="full"), dict(remat="save_dots")):
        cfg = plain.replace(**kw)
        p = params_from_hf_state_dict(cfg, sd)
        out = jax.jit(CausalLM(cfg).apply)({"params": p}, IDS)
        chex.assert_shape(out, (2, 13, 37))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, err_msg=str(kw))


def test_bfloat16_compute_is_close_to_float32():
    cfg = ModelConfig(**BASE)
    params = random_params(CausalLM(cfg), 2, scale=0.15)
    ref = jax.jit(CausalLM(cfg).apply)({"params": params}, IDS)
    out = jax.jit(CausalLM(cfg.replace(dtype="bfloat16")).apply)({"params": params}, IDS)
    assert out.dtype == jnp.float32  # logits always float32
    chex.assert_shape(out, (2, 13, 37))
    err = np.abs(np.asarray(out) - np.asarray(ref)).max()
    assert err < 0.05 * np.abs(np.asarray(ref)).max(), err


@pytest.mark.parametrize("scheme", ["lingua", "hf"])
def test_init_schemes(scheme):
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=128,
        num_layers=1,
        num_heads=2,
        intermediate_size=256,
        canon_set="ABCD",
        qk_norm=True,
        init_scheme=scheme,
        initializer_range=0.05,
    )
    p = nn.unbox(jax.jit(CausalLM(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    layer = p["layers_0"]
    trunc = 0.98654  # std of a unit normal truncated at +-3
    for w, fan in (
        (layer["mixer"]["q_proj"]["kernel"], 128),
        (layer["mlp"]["gate_proj"]["kernel"], 128),
        (layer["mlp"]["down_proj"]["kernel"], 256),
        (p["embed"]["embedding"], 128),
        (p["lm_head"]["kernel"], 128),
    ):
        w = np.asarray(w)
        if scheme == "lingua":
            np.testing.assert_allclose(w.std(), trunc * fan**-0.5, rtol=0.05)
            assert np.abs(w).max() <= 3 * fan**-0.5 + 1e-6
        else:
            np.testing.assert_allclose(w.std(), 0.05, rtol=0.05)
    for norm in (layer["attn_norm"], layer["mlp_norm"], layer["mixer"]["q_norm"], p["final_norm"]):
        np.testing.assert_array_equal(np.asarray(norm["scale"]), 1.0)
    canon = np.asarray(layer["mixer"]["canon_b"]["kernel"])  # Kaiming-uniform U(-1/2, 1/2) for K=4, both schemes
    assert np.abs(canon).max() <= 0.5 and np.abs(canon).max() > 0.45


@pytest.mark.parametrize("arch,canon_set", [("llama", "ABCD"), ("gla", "AbCD"), ("gdn", "AbCD"), ("mamba2", "AbCD")])
def test_auto_init_follows_the_official_release_per_arch(arch, canon_set):
    """init_scheme="auto": Llama lingua trunc-normal d^-1/2; GLA5/GDN2 HF N(0, 0.02); Mamba2 PyTorch
    Linear default U(+-fan_in^-1/2) with embedding N(0, 0.1)."""
    d, ffn = 128, 256
    cfg = ModelConfig(
        arch=arch,
        vocab_size=256,
        hidden_size=d,
        num_layers=1,
        num_heads=2,
        intermediate_size=ffn,
        canon_set=canon_set,
        ssm_state_size=16,
    )
    assert cfg.init_scheme == "auto"
    p = nn.unbox(jax.jit(CausalLM(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    mlp = p["layers_0"]["mlp"]
    up = np.asarray(mlp["gate_proj"]["kernel"] if arch == "llama" else mlp["both_proj"]["kernel"])
    down, emb, head = (
        np.asarray(a) for a in (mlp["down_proj"]["kernel"], p["embed"]["embedding"], p["lm_head"]["kernel"])
    )
    if arch == "llama":
        for w, fan in ((up, d), (down, ffn), (emb, d), (head, d)):
            np.testing.assert_allclose(w.std(), 0.98654 * fan**-0.5, rtol=0.05)
    elif arch in ("gla", "gdn"):
        for w in (up, down, emb, head):
            np.testing.assert_allclose(w.std(), 0.02, rtol=0.05)
            assert np.abs(w).max() > 3.5 * 0.02  # a plain normal, not truncated
    else:
        for w, fan in ((up, d), (down, ffn), (head, d)):
            assert np.abs(w).max() <= fan**-0.5 and np.abs(w).max() > 0.98 * fan**-0.5
            np.testing.assert_allclose(w.std(), fan**-0.5 / np.sqrt(3), rtol=0.05)
        np.testing.assert_allclose(emb.std(), 0.1, rtol=0.05)


def test_segment_aware_packing_equals_separate_documents():
    cfg = ModelConfig(**BASE, segment_aware=True)
    model = CausalLM(cfg)
    params = random_params(model, 3)
    apply = jax.jit(model.apply)
    a, b = IDS[0, :6], IDS[1, :7]
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 6 + [2] * 7], np.int32)
    pos = np.array([list(range(6)) + list(range(7))], np.int32)
    out = apply({"params": params}, packed, segment_ids=seg, positions=pos)
    chex.assert_shape(out, (1, 13, 37))
    np.testing.assert_allclose(np.asarray(out)[0, :6], np.asarray(apply({"params": params}, a[None]))[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out)[0, 6:], np.asarray(apply({"params": params}, b[None]))[0], atol=1e-5)
    # without segment_aware the second document sees the first one (the official default)
    plain = jax.jit(CausalLM(cfg.replace(segment_aware=False)).apply)(
        {"params": params}, packed, segment_ids=seg, positions=pos
    )
    assert np.abs(np.asarray(plain)[0, 6:] - np.asarray(out)[0, 6:]).max() > 1e-3


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_axes(scan):
    cfg = ModelConfig(**BASE, scan_layers=scan, canon_bias=True)
    boxed = jax.eval_shape(lambda: CausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    allowed = {
        "batch",
        "length",
        "embed",
        "vocab",
        "mlp",
        "heads",
        "kv_heads",
        "head_dim",
        "qkv",
        "conv_kernel",
        "layers",
    }
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= allowed, leaf.names
    if scan:
        assert boxed["layers"]["mixer"]["q_proj"]["kernel"].names == ("layers", "embed", "heads")
    else:
        assert boxed["layers_0"]["mixer"]["canon_b"]["kernel"].names == ("conv_kernel", "qkv")
        assert boxed["layers_0"]["mlp"]["canon_d"]["kernel"].names == ("conv_kernel", "mlp")


def test_config_validation_errors():
    with pytest.raises(ValueError, match="rope_dim"):
        ModelConfig(hidden_size=32, num_heads=4, rope_dim=3)
    with pytest.raises(ValueError, match="rope_dim"):
        ModelConfig(hidden_size=32, num_heads=4, rope_dim=16)
    with pytest.raises(ValueError, match="canon_set"):
        ModelConfig(canon_set="AbC")
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_version"):
        ModelConfig(rope_version="neox")
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(remat="some")


def test_bad_model_inputs():
    model = CausalLM(ModelConfig(**BASE))
    params = random_params(model, 0)
    with pytest.raises(ValueError, match="input_ids must be"):
        model.apply({"params": params}, IDS[0])
    with pytest.raises(ValueError, match="token_mask"):
        model.apply({"params": params}, IDS, token_mask=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="integers"):
        model.apply({"params": params}, IDS.astype(np.float32))


def test_mixer_registry(monkeypatch):
    monkeypatch.setattr(registry, "_MIXERS", dict(registry._MIXERS))

    class Identity(nn.Module):
        config: ModelConfig

        @nn.compact
        def __call__(self, x, *, positions=None, segment_ids=None, token_mask=None, decode=False):
            return nn.Dense(x.shape[-1], use_bias=False, name="proj")(x)

    registry.register_mixer("gla", Identity)
    cfg = ModelConfig(arch="gla", vocab_size=11, hidden_size=16, num_layers=1, num_heads=2, canon_set="ACD")
    shapes = jax.eval_shape(lambda: CausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32)))
    layer = nn.unbox(shapes["params"])["layers_0"]
    assert set(layer["mixer"]) == {"proj"}
    chex.assert_shape(layer["mlp"]["both_proj"]["kernel"], (16, 64))  # fused gate||up for the linear archs
    chex.assert_shape(layer["mlp"]["canon_d"]["kernel"], (4, 64))
    no_mlp = jax.eval_shape(
        lambda: CausalLM(cfg.replace(use_mlp=False, canon_set="A")).init(
            jax.random.key(0), jnp.zeros((1, 3), jnp.int32)
        )
    )
    assert "mlp" not in nn.unbox(no_mlp["params"])["layers_0"]
    monkeypatch.setattr(registry, "_MIXERS", {})
    with pytest.raises(ValueError, match="no registered mixer"):
        registry.get_mixer("mamba2")
