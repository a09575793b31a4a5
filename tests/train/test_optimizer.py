"""Schedule and AdamW against independent float64 numpy references (the official lingua schedule)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.train.config import OptimSection
from canon_jax.train.optimizer import decay_mask, lr_schedule, make_optimizer


def _ref_lr(step, lr, steps, warmup, r):
    if step < warmup:
        return lr * step / warmup
    s = min(max((step - warmup) / (steps - warmup), 0.0), 1.0)
    return lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * s)))


def test_cosine_schedule_matches_formula():
    fn = lr_schedule(3e-3, 100, 10, 0.01)
    for step in [0, 1, 5, 9, 10, 11, 50, 99, 100, 150]:
        np.testing.assert_allclose(float(fn(step)), _ref_lr(step, 3e-3, 100, 10, 0.01), rtol=1e-6, atol=1e-12)
    assert float(fn(100)) == pytest.approx(3e-5, rel=1e-6)  # ends at lr_min_ratio * lr
    const = lr_schedule(1e-3, 100, 4, 0.01, kind="constant")
    assert float(const(2)) == pytest.approx(5e-4) and float(const(60)) == pytest.approx(1e-3)


def _adamw_ref(params, grads_seq, lr_fn, b1, b2, eps, wd, clip, mask):
    """float64 torch.optim.AdamW semantics with global-norm clipping."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads_seq, start=1):
        g = {k: x.astype(np.float64) for k, x in g.items()}
        norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
        if clip and norm > clip:
            g = {k: x * clip / norm for k, x in g.items()}
        lr = lr_fn(t - 1)
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            mh, vh = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            upd = mh / (np.sqrt(vh) + eps) + (wd * p[k] if mask[k] else 0.0)
            p[k] = p[k] - lr * upd
    return p


@pytest.mark.parametrize("decay", ["all", "no_norm_bias_embed"])
def test_adamw_matches_reference(decay):
    rng = np.random.default_rng(0)
    params = {
        "embed": rng.normal(size=(5, 3)).astype(np.float32),
        "dense": rng.normal(size=(3, 4)).astype(np.float32),
        "norm": rng.normal(size=(4,)).astype(np.float32),
    }
    grads_seq = [
        {k: (rng.normal(size=x.shape) * s).astype(np.float32) for k, x in params.items()} for s in (0.1, 5.0, 1.0, 0.3)
    ]  # step 2 exceeds the clip norm
    optim = OptimSection(lr=1e-2, warmup_steps=1, weight_decay=0.1, decay=decay, lr_min_ratio=0.1)
    tx, sched = make_optimizer(optim, steps=4)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads_seq:
        upd, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = jax.tree.map(lambda a, b: a + b, p, upd)
    mask = {"embed": decay == "all", "dense": True, "norm": decay == "all"}
    ref = _adamw_ref(params, grads_seq, lambda s: _ref_lr(s, 1e-2, 4, 1, 0.1), 0.9, 0.95, 1e-8, 0.1, 1.0, mask)
    for k in params:
        chex.assert_shape(p[k], params[k].shape)
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=2e-5, atol=2e-6)


def test_decay_mask_by_path():
    params = {
        "embed": {"embedding": 1.0},
        "layers_0": {"attn_norm": {"scale": 1.0}, "q": {"kernel": 1.0}, "mlp": {"bias": 1.0}},
    }
    m = decay_mask(params, "no_norm_bias_embed")
    assert m == {
        "embed": {"embedding": False},
        "layers_0": {"attn_norm": {"scale": False}, "q": {"kernel": True}, "mlp": {"bias": False}},
    }
    assert all(jax.tree.leaves(decay_mask(params, "all")))
    with pytest.raises(ValueError, match="mode"):
        decay_mask(params, "none")
