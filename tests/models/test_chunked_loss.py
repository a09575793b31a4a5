"""The model's chunked loss path (``return_hidden=True`` + chunked_cross_entropy) against its full float32 logits,
for tied and untied heads: same loss and the same gradient for every parameter."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.config import ModelConfig
from canon_jax.losses import chunked_cross_entropy, cross_entropy
from canon_jax.models import CausalLM


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_matches_full_logits(tie):
    cfg = ModelConfig(
        vocab_size=37, hidden_size=16, num_layers=1, num_heads=2, multiple_of=16, canon_set="AC", tie_embeddings=tie
    )
    model = CausalLM(cfg)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 37, size=(2, 10)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 37, size=(2, 10)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 10)) > 0.2, jnp.float32)
    params = model.init(jax.random.key(0), ids)["params"]

    def full(p):
        return cross_entropy(model.apply({"params": p}, ids), targets, mask, z_loss="palm", z_loss_weight=1e-2)[0]

    def chunked(p):
        hidden, head, layout = model.apply({"params": p}, ids, return_hidden=True)
        chex.assert_shape(hidden, (2, 10, 16))
        assert layout == ("vd" if tie else "dv")
        return chunked_cross_entropy(
            hidden, head, targets, mask, head_layout=layout, chunk_size=4, z_loss="palm", z_loss_weight=1e-2
        )[0]

    with jax.default_matmul_precision("highest"):
        ref, ref_g = jax.value_and_grad(full)(params)
        loss, g = jax.value_and_grad(chunked)(params)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    chex.assert_trees_all_close(g, ref_g, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="return_hidden"):
        model.init(jax.random.key(0), ids, return_hidden=True)
