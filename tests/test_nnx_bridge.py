"""canon-jax Linen modules inside a flax.nnx model through flax.nnx.bridge.ToNNX."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from canon_jax.config import ModelConfig
from canon_jax.layers import Canon
from canon_jax.models import CausalLM

CFG = ModelConfig(vocab_size=23, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24, canon_set="ABCD")


class Wrapped(nnx.Module):
    """An NNX model: a Linen CausalLM followed by a native NNX layer, plus a Linen Canon on its own."""

    def __init__(self, rngs):
        self.lm = nnx.bridge.ToNNX(CausalLM(CFG), rngs=rngs)
        self.canon = nnx.bridge.ToNNX(Canon(kernel_size=3), rngs=rngs)
        self.out = nnx.Linear(23, 4, rngs=rngs)

    def __call__(self, ids, x):
        return self.out(self.lm(ids)), self.canon(x)


def test_forward_matches_linen_apply():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 23, size=(2, 7)), jnp.int32)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 5)), jnp.float32)
    model = Wrapped(nnx.Rngs(0))
    # Our params carry logical axis names; without a mesh NNX must not try to shard them eagerly.
    with nnx.use_eager_sharding(False):
        # lazy_init under nnx.jit: one compilation instead of one per eager op
        nnx.jit(lambda m, i, a: (nnx.bridge.lazy_init(m.lm, i), nnx.bridge.lazy_init(m.canon, a)) and None)(
            model, ids, x
        )
    y, z = nnx.jit(lambda m, i, a: m(i, a))(model, ids, x)
    chex.assert_shape(y, (2, 7, 4))
    chex.assert_shape(z, (2, 7, 5))
    # the same variables through plain Linen apply
    lm_vars = nnx.to_pure_dict(nnx.state(model.lm))
    canon_vars = nnx.to_pure_dict(nnx.state(model.canon))
    logits = jax.jit(CausalLM(CFG).apply)({"params": lm_vars}, ids)
    ref_y = logits @ model.out.kernel[...] + model.out.bias[...]
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(z), np.asarray(Canon(kernel_size=3).apply({"params": canon_vars}, x)), atol=1e-6
    )
