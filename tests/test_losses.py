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
    extra = {"none": 0 * nll, "official": w * nll**2, "palm": w * logz**2}[mode]
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


# ----------------------------------------------------------------------------------------------------------------------
# chunked_cross_entropy: the same objective from hidden states and the head weight, never materialising the logits
from canon_jax.losses import chunked_cross_entropy  # noqa: E402


def _head_problem(seed, b=2, t=7, d=6, v=13):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)) * 1.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) * (rng.random((b, t)) > 0.3), jnp.float32)  # fractional weights and zeros
    return hidden, head, targets, mask


# chunk 3 does not divide the 7 time steps (padded tail); 7 divides; 64 > time (one chunk); 1 = one step per chunk
@pytest.mark.parametrize(
    "mode,layout,chunk",
    [(m, lay, 3) for m in ("none", "official", "palm") for lay in ("dv", "vd")]
    + [("official", "vd", 1), ("palm", "dv", 7), ("none", "dv", 64)],
)
def test_chunked_matches_full_logits(mode, layout, chunk):
    hidden, head, targets, mask = _head_problem(2)
    w = head if layout == "dv" else head.T

    def full(h, hd):
        return cross_entropy(
            jnp.einsum("btd,dv->btv", h, hd, precision="highest"), targets, mask, z_loss=mode, z_loss_weight=1e-2
        )

    def chunked(h, wt):
        return chunked_cross_entropy(
            h, wt, targets, mask, head_layout=layout, chunk_size=chunk, z_loss=mode, z_loss_weight=1e-2
        )

    with jax.default_matmul_precision("highest"):
        (loss, aux), (gh, gw) = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, w)
        (ref, ref_aux), (rh, rw) = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, head)
    chex.assert_shape(loss, ())
    chex.assert_shape(aux["token_nll"], (2, 7))
    chex.assert_shape((gh, gw), (hidden.shape, w.shape))
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    for k in ("nll", "z_loss", "num_tokens"):
        np.testing.assert_allclose(float(aux[k]), float(ref_aux[k]), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(aux["token_nll"]), np.asarray(ref_aux["token_nll"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(rh), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gw if layout == "dv" else gw.T), np.asarray(rw), rtol=1e-5, atol=1e-7)


def test_chunked_bf16_accumulates_in_float32():
    """bf16 operands, float32 products and sums: equal to float64 logits of the bf16-rounded operands."""
    hidden, head, targets, _ = _head_problem(3, b=2, t=9, d=64, v=50)
    hb, wb = hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16)
    loss, _ = chunked_cross_entropy(hb, wb, targets, chunk_size=4)
    assert loss.dtype == jnp.float32
    gh, gw = jax.grad(lambda h, w: chunked_cross_entropy(h, w, targets, chunk_size=4)[0], argnums=(0, 1))(hb, wb)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    logits = np.einsum("btd,dv->btv", np.asarray(hb, np.float64), np.asarray(wb, np.float64))
    ref, _ = _np_reference(logits, np.asarray(targets), None, "none", 0.0)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-6)


def test_chunked_errors():
    h, w, t = np.zeros((1, 4, 3), np.float32), np.zeros((3, 5), np.float32), np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="head_layout"):
        chunked_cross_entropy(h, w, t, head_layout="vv")
    with pytest.raises(ValueError, match=r"head must be \[vocab, d\]"):
        chunked_cross_entropy(h, w, t, head_layout="vd")
    with pytest.raises(ValueError, match="z_loss"):
        chunked_cross_entropy(h, w, t, z_loss="l2")
    with pytest.raises(ValueError, match="loss_mask"):
        chunked_cross_entropy(h, w, t, np.ones((1, 3)))
