"""Every remat policy, with and without ``canon_recompute``, gives the loss and gradients of the model without remat
(Llama and GDN with Canon layers, per-layer and scanned), and a bad policy name is a one-line config error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.config import REMAT, ModelConfig
from canon_jax.models import CausalLM
from canon_jax.models.causal_lm import REMAT_POLICIES

ARCHS = {
    "llama": dict(arch="llama", canon_set="ABCD"),
    "gdn": dict(arch="gdn", canon_set="AbBCD", linear_chunk_size=4),
}


def _loss_and_grads(cfg, params, ids):
    model = CausalLM(cfg)

    def loss(p):
        logits = model.apply({"params": p}, ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    return jax.jit(jax.value_and_grad(loss))(params)


def test_policies_cover_config_choices():
    assert set(REMAT) == set(REMAT_POLICIES) | {"none"}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_match_no_remat(arch, scan):
    base = ModelConfig(
        vocab_size=41, hidden_size=16, num_layers=2, num_heads=2, multiple_of=16, scan_layers=scan, **ARCHS[arch]
    )
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 41, size=(2, 8)), jnp.int32)
    params = CausalLM(base).init(jax.random.key(0), ids)["params"]
    ref_loss, ref_grads = _loss_and_grads(base, params, ids)
    for policy, recompute in [(p, r) for p in REMAT_POLICIES for r in ("ABC", "ABCD", "", "auto")]:
        loss, grads = _loss_and_grads(base.replace(remat=policy, canon_recompute=recompute), params, ids)
        policy = f"{policy} canon_recompute={recompute!r}"
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, err_msg=policy)
        # float32 recomputation fuses differently: compare each leaf to 1e-5 of its own scale
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
            r = np.asarray(r)
            np.testing.assert_allclose(
                np.asarray(g),
                r,
                rtol=1e-5,
                atol=1e-5 * np.abs(r).max(),
                err_msg=f"{policy} {jax.tree_util.keystr(path)}",
            )


def test_bad_remat_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^ModelConfig.remat: must be one of .*save_canon_attn.*'dots'$"):
        ModelConfig(remat="dots")


def test_bad_canon_recompute_is_a_one_line_error():
    with pytest.raises(
        ValueError, match=r"^ModelConfig.canon_recompute: must be 'auto' or a string of the letters 'ABCD', got 'b'$"
    ):
        ModelConfig(canon_recompute="b")
    with pytest.raises(ValueError, match=r"^ModelConfig.canon_recompute: .* got True$"):
        ModelConfig(canon_recompute=True)
