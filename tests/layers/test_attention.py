import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from canon_jax.config import ModelConfig
from canon_jax.layers.attention import Attention, dot_product_attention


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
