"""Flash attention kernels (canon_jax.ops.attention) against a float64 loop (values) and the blocked XLA attention
(gradients): splash in the Pallas interpreter, and the cuDNN wrapper's mask construction through XLA."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.config import ModelConfig
from canon_jax.layers.attention import causal_attention
from canon_jax.ops import attention as fa
from tests.layers.test_attention import causal_reference as _reference


def _inputs(t, h=4, kvh=2, hd=16, b=2, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, hd)).astype(np.float32)
    k, v = (rng.normal(size=(b, t, kvh, hd)).astype(np.float32) for _ in range(2))
    # packed documents of uneven lengths, several inside one 128-row tile and one crossing tile boundaries
    seg = np.stack([np.sort(rng.integers(1, 5, t)) for _ in range(b)]).astype(np.int32)
    return q, k, v, seg


def _grads(fn, q, k, v, w):
    """Gradients of a weighted sum of the outputs (``w`` zero at rows that must not count)."""
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * w), argnums=(0, 1, 2)))(q, k, v)


def test_splash_matches_reference_with_segments_and_gqa():
    """Three 128-row tiles (T = 300 padded to 384): causal tile skipping, packed documents, 2 query heads per KV
    head; values vs the float64 loop, gradients of q, k, v vs the blocked XLA attention."""
    q, k, v, seg = _inputs(300)
    splash = functools.partial(fa.splash_attention, segment_ids=jnp.asarray(seg), interpret=True, block_size=128)
    out = jax.jit(splash)(q, k, v)
    chex.assert_shape(out, q.shape)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, np.ones(seg.shape, bool), seg), atol=2e-5)
    w = jnp.ones(q.shape[:2] + (1, 1))
    ours = _grads(splash, q, k, v, w)
    ref = _grads(lambda q, k, v: causal_attention(q, k, v, segment_ids=jnp.asarray(seg)), q, k, v, w)
    for a, r in zip(ours, ref):
        chex.assert_shape(a, r.shape)
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5)


def test_splash_key_mask_single_kv_head():
    """Left padding (``key_valid``) without segment ids, one KV head for four query heads (MQA), T not a multiple of
    128: outputs at valid queries and all gradients (padding rows carry no loss)."""
    q, k, v, _ = _inputs(45, kvh=1, seed=1)
    valid = np.ones((2, 45), bool)
    valid[1, :7] = False
    seg = np.ones((2, 45), np.int32)
    splash = functools.partial(fa.splash_attention, key_valid=jnp.asarray(valid), interpret=True)
    out = np.asarray(jax.jit(splash)(q, k, v))
    ref = _reference(q, k, v, valid, seg)
    np.testing.assert_allclose(out[valid], ref[valid], atol=2e-5)
    assert np.all(np.isfinite(out))
    w = jnp.asarray(valid, jnp.float32)[:, :, None, None]
    ours = _grads(splash, q, k, v, w)
    ref = _grads(lambda q, k, v: causal_attention(q, k, v, key_valid=jnp.asarray(valid)), q, k, v, w)
    for a, r in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5)


def test_cudnn_wrapper_masks_through_xla():
    """The cuDNN call's causal flag, scale and segment/key mask, run through XLA's implementation of the same API
    (cuDNN itself needs an NVIDIA GPU): values vs the float64 loop, gradients vs the blocked attention."""
    q, k, v, seg = _inputs(37, seed=2)
    valid = np.ones((2, 37), bool)
    valid[0, :3] = False
    call = functools.partial(
        fa.cudnn_attention, segment_ids=jnp.asarray(seg), key_valid=jnp.asarray(valid), implementation="xla"
    )
    out = np.asarray(jax.jit(call)(q, k, v))
    chex.assert_shape(out, q.shape)
    np.testing.assert_allclose(out[valid], _reference(q, k, v, valid, seg)[valid], atol=2e-5)
    w = jnp.asarray(valid, jnp.float32)[:, :, None, None]
    ours = _grads(call, q, k, v, w)
    ref = _grads(
        lambda q, k, v: causal_attention(q, k, v, segment_ids=jnp.asarray(seg), key_valid=jnp.asarray(valid)),
        q,
        k,
        v,
        w,
    )
    for a, r in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5)


def test_resolution_on_cpu_and_bad_names():
    q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
    assert fa.resolve("auto", q, q) == "xla"
    assert fa.flash_attention("xla", q, q, q) is None
    assert fa.resolve("splash_interpret", q, q) == "splash_interpret"
    with pytest.raises(NotImplementedError, match="splash_interpret"):
        fa.resolve("splash", q, q)
    with pytest.raises(NotImplementedError, match="NVIDIA GPU"):
        fa.resolve("cudnn", q, q)
    with pytest.raises(ValueError, match="attention_impl"):
        fa.resolve("flash", q, q)
    with pytest.raises(ValueError, match="ModelConfig.attention_impl"):
        ModelConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="block_size"):
        fa.splash_attention(q, q, q, block_size=96)
    with pytest.raises(ValueError, match="float32 precision"):  # conftest sets "highest" for the float64 oracles
        fa.splash_attention(q, q, q)
    assert fa.cudnn_supports(q, q) and not fa.cudnn_supports(q.astype(jnp.float32), q.astype(jnp.float32))


def test_llama_with_splash_equals_xla_attention():
    """A 1-layer Llama (GQA, QK-norm, partial RoPE, segment-aware, packed documents): logits and every
    parameter gradient with ``attention_impl="splash_interpret"`` equal the XLA attention's."""
    from canon_jax.models import CausalLM

    base = ModelConfig(
        vocab_size=64,
        hidden_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        qk_norm=True,
        rope_dim=8,
        segment_aware=True,
        attention_impl="xla",
    )
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, 64, (2, 40)), jnp.int32)
    seg = jnp.asarray(np.sort(rng.integers(1, 4, (2, 40))), jnp.int32)
    params = CausalLM(base).init(jax.random.key(0), ids)["params"]

    def run(cfg):
        model = CausalLM(cfg)
        loss = lambda p: jnp.mean(jnp.sin(model.apply({"params": p}, ids, segment_ids=seg)))
        return jax.jit(lambda p: (model.apply({"params": p}, ids, segment_ids=seg), jax.grad(loss)(p)))(params)

    logits, grads = run(base.replace(attention_impl="splash_interpret"))
    ref_logits, ref_grads = run(base)
    chex.assert_shape(logits, (2, 40, 64))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-4)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5)


@pytest.mark.multidevice
def test_splash_under_shard_map_matches_unsharded():
    """Batch over fsdp, query and KV heads over tensor (4 simulated devices, in a subprocess)."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).with_name("_attention_sharded_check.py"))],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0 and "SHARDED_ATTENTION_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
