import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.config import ModelConfig
from canon_jax.layers.attention import Attention, causal_attention, dot_product_attention


def test_dot_product_attention_gqa_matches_numpy():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
    k = rng.normal(size=(2, 7, 2, 4)).astype(np.float32)
    v = rng.normal(size=(2, 7, 2, 4)).astype(np.float32)
    allowed = rng.random((2, 5, 7)) > 0.3
    allowed[:, :, 0] = True
    out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed))
    chex.assert_shape(out, (2, 5, 6, 4))
    ref = np.zeros((2, 5, 6, 4))
    for b in range(2):
        for h in range(6):
            g = h // 3  # 3 query heads per KV head, as HF repeat_kv
            for t in range(5):
                s = q[b, t, h].astype(np.float64) @ k[b, :, g].T.astype(np.float64) / 2.0
                s = np.where(allowed[b, t], s, -np.inf)
                p = np.exp(s - s.max())
                ref[b, t, h] = (p / p.sum()) @ v[b, :, g]
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    # a query with no visible key stays finite
    none = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.zeros((2, 5, 7), bool))
    assert bool(jnp.all(jnp.isfinite(none)))


def causal_reference(q, k, v, valid, seg):
    """float64 loop: query t of head h sees keys s <= t that are valid and in its segment (KV head h // groups)."""
    b_, t_, h_, hd = q.shape
    g = h_ // k.shape[2]
    out = np.zeros(q.shape)
    for b in range(b_):
        for h in range(h_):
            for t in range(t_):
                keep = (np.arange(t_) <= t) & valid[b] & (seg[b] == seg[b, t])
                if not keep.any():  # no key to attend: undefined (never compared)
                    out[b, t, h] = np.nan
                    continue
                s = q[b, t, h].astype(np.float64) @ k[b, :, h // g].T.astype(np.float64) / np.sqrt(hd)
                p = np.exp(np.where(keep, s, -np.inf) - s[keep].max())
                out[b, t, h] = (p / p.sum()) @ v[b, :, h // g].astype(np.float64)
    return out


@pytest.mark.parametrize("t,block", [(13, 4), (16, 16), (5, 8)])
def test_causal_attention_skips_blocks_and_matches_the_masked_reference(t, block):
    """Query blocks of ``block`` rows (T not a multiple of it, one block, several) with GQA, key padding and segment
    ids: values against a float64 loop, gradients against ``dot_product_attention`` with the full mask."""
    rng = np.random.default_rng(2)
    q = rng.normal(size=(2, t, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, t, 2, 8)).astype(np.float32) for _ in range(2))
    valid = np.ones((2, t), bool)
    valid[1, 2] = valid[1, t - 1] = False  # padded keys in the middle and at the end (never the first token)
    seg = np.zeros((2, t), np.int32)
    seg[0, t // 2 :] = 1  # two packed documents in row 0
    fn = lambda q, k, v: causal_attention(
        q, k, v, key_valid=jnp.asarray(valid), segment_ids=jnp.asarray(seg), block_size=block, max_blocks=64
    )
    out = jax.jit(fn)(q, k, v)
    chex.assert_shape(out, (2, t, 4, 8))
    np.testing.assert_allclose(np.asarray(out), causal_reference(q, k, v, valid, seg), atol=2e-6)
    allowed = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :] & (seg[:, :, None] == seg[:, None, :])
    full = lambda q, k, v: dot_product_attention(q, k, v, jnp.asarray(allowed))
    w = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    for name, ga, gr in zip(("dq", "dk", "dv"), grad(fn), grad(full)):
        chex.assert_shape(ga, gr.shape)
        np.testing.assert_allclose(np.asarray(ga), np.asarray(gr), atol=2e-5, err_msg=name)


def test_attention_is_causal_and_masked_keys_are_invisible():
    cfg = ModelConfig(hidden_size=32, num_heads=4, num_kv_heads=2, canon_set="B", qk_norm=True, rope_dim=4)
    layer = Attention(cfg)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 8, 32)), jnp.float32)
    params = jax.jit(layer.init)(jax.random.key(0), x)
    apply = jax.jit(layer.apply)
    y = apply(params, x)
    chex.assert_shape(y, (1, 8, 32))
    x2 = x.at[:, 5:].set(7.0)  # changing the future does not change the past
    np.testing.assert_allclose(np.asarray(apply(params, x2))[:, :5], np.asarray(y)[:, :5], atol=1e-6)
    mask = jnp.asarray([[True, True, False, True, True, True, True, True]])
    x3 = x.at[:, 2].set(-5.0)  # a masked token's content is irrelevant (keys masked, Canon-B input zeroed)
    a = apply(params, x, token_mask=mask)
    b = apply(params, x3, token_mask=mask)
    np.testing.assert_allclose(np.asarray(a)[:, 3:], np.asarray(b)[:, 3:], atol=1e-6)
    axes = nn.get_partition_spec(params)["params"]
    assert tuple(axes["q_proj"]["kernel"]) == ("embed", "heads")
    assert tuple(axes["k_norm"]["scale"]) == ("kv_heads",)
