import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.layers import Canon
from canon_jax.ops import causal_conv1d


@pytest.mark.parametrize("k", [1, 4, 6])
def test_init_is_pytorch_conv1d_default(k):
    params = Canon(kernel_size=k).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 4096)))["params"]
    w = np.asarray(nn.meta.unbox(params)["kernel"])
    chex.assert_shape(w, (k, 4096))
    bound = 1 / np.sqrt(k)
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.95 * bound  # uniform over the whole range
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.05)


def test_bias_initialised_to_zero_and_used():
    layer = Canon(use_bias=True, activation="silu")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x)["params"])
    np.testing.assert_array_equal(np.asarray(params["bias"]), 0)
    params["bias"] = jnp.full((8,), 0.5)
    y = layer.apply({"params": params}, x)
    ref = causal_conv1d(x, params["kernel"], bias=params["bias"], activation="silu", residual=True)
    chex.assert_shape(y, x.shape)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-6)


def test_decode_cache_equals_full_pass():
    layer = Canon(kernel_size=4)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 8))
    variables = layer.init(jax.random.PRNGKey(0), x[:, :1], decode=True)
    params, cache = variables["params"], variables["cache"]
    chex.assert_shape(cache["state"], (2, 8, 4))
    full = layer.apply({"params": params}, x)
    y_pre, upd = layer.apply({"params": params, "cache": cache}, x[:, :3], decode=True, mutable=["cache"])
    outs, cache = [y_pre], upd["cache"]
    for t in range(3, 9):
        y_t, upd = layer.apply({"params": params, "cache": cache}, x[:, t : t + 1], decode=True, mutable=["cache"])
        outs.append(y_t)
        cache = upd["cache"]
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-6)
