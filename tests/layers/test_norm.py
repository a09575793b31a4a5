import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from canon_jax.layers.norm import RMSNorm, rms_norm


def test_rms_norm_matches_numpy_float64():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 16)) * 3
    w = rng.normal(size=(16,))
    y = rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), 1e-5)
    chex.assert_shape(y, (2, 3, 16))
    ref = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)


def test_module_scale_init_axes_and_bf16():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 8)), jnp.bfloat16)
    layer = RMSNorm(eps=1e-6, axis_name="heads")
    variables = layer.init(jax.random.key(0), x)
    box = variables["params"]["scale"]
    assert box.names == ("heads",)
    np.testing.assert_array_equal(np.asarray(nn.unbox(box)), 1.0)
    y = layer.apply(variables, x)
    chex.assert_shape(y, (2, 5, 8))
    assert y.dtype == jnp.bfloat16  # statistics in float32, output in the input dtype
    ref = rms_norm(x.astype(jnp.float32), jnp.ones(8), 1e-6)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=1e-2, atol=1e-2)


def test_out_dtype():
    """The linear mixers keep the normalised output in float32 (``out_dtype``) to multiply it with their gate."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.bfloat16)
    w = rng.normal(size=(8,))
    y = rms_norm(x, jnp.asarray(w, jnp.float32), 1e-5, out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    chex.assert_shape(y, (2, 3, 8))
    xs = np.asarray(x, np.float64)  # the bf16 values, exactly
    ref = xs / np.sqrt((xs**2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
