"""cross_entropy vs a float64 numpy reference for every z-loss mode, with and without a loss mask."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.losses import cross_entropy


def _np_reference(logits, targets, mask, mode, w):
    lg = logits.astype(np.float64)
    m = lg.max(-1, keepdims=True)
    logz = np.log(np.exp(lg - m).sum(-1)) + m[..., 0]
    nll = logz - np.take_along_axis(lg, targets[..., None], -1)[..., 0]
    extra = {"none": 0 * nll, "official": w * nll ** 2, "palm": w * logz ** 2}[mode]
    mask = np.ones_like(nll) if mask is None else mask.astype(np.float64)
    return ((nll + extra) * mask).sum() / mask.sum(), (nll * mask).sum() / mask.sum()


@pytest.mark.parametrize("mode", ["none", "official", "palm"])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_numpy(mode, masked):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, 7, 11)) * 4 + 2).astype(np.float32)  # offset: logZ far from 0 for the PaLM term
    targets = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
    mask = (rng.random((3, 7)) > 0.4).astype(np.float32) if masked else None
    loss, aux = cross_entropy(logits, targets, mask, z_loss=mode, z_loss_weight=1e-2)
    chex.assert_shape(loss, ())
    chex.assert_shape(aux["token_nll"], (3, 7))
    ref, ref_nll = _np_reference(logits, targets, mask, mode, 1e-2)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-6)
    np.testing.assert_allclose(float(aux["nll"]), ref_nll, rtol=1e-6)
    np.testing.assert_allclose(float(aux["z_loss"]), ref - ref_nll, rtol=1e-5, atol=1e-7)
    assert float(aux["num_tokens"]) == (21 if mask is None else mask.sum())


def test_bf16_logits_and_gradient():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 5, 9)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 9, size=(2, 5)), jnp.int32)
    loss, _ = cross_entropy(logits, targets)
    assert loss.dtype == jnp.float32
    g = jax.grad(lambda x: cross_entropy(x, targets, z_loss="official")[0])(logits.astype(jnp.float32))
    chex.assert_shape(g, (2, 5, 9))
    # d/dlogits of mean(l + w l^2) = (1 + 2 w l) (softmax - onehot) / N
    lf = np.asarray(logits.astype(jnp.float32), np.float64)
    p = np.exp(lf - lf.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(9)[np.asarray(targets)]
    nll = -np.log((p * onehot).sum(-1))
    ref = (1 + 2e-4 * nll)[..., None] * (p - onehot) / 10
    np.testing.assert_allclose(np.asarray(g), ref, atol=1e-6)


def test_all_masked_is_zero_and_errors():
    loss, aux = cross_entropy(np.zeros((1, 3, 4), np.float32), np.zeros((1, 3), np.int32), np.zeros((1, 3)))
    assert float(loss) == 0.0 and float(aux["num_tokens"]) == 0
    with pytest.raises(ValueError, match="z_loss"):
        cross_entropy(np.zeros((1, 3, 4)), np.zeros((1, 3), np.int32), z_loss="l2")
    with pytest.raises(ValueError, match="loss_mask"):
        cross_entropy(np.zeros((1, 3, 4)), np.zeros((1, 3), np.int32), np.ones((3,)))
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(np.zeros((1, 3, 4)), np.zeros((1, 4), np.int32))
