"""AdamW with the official recipe's schedule, clipping and weight-decay masks.

Schedule (the official lingua recipe): linear warmup from 0 to ``lr`` over ``warmup`` steps, then
``lr * (r + (1 - r) * 0.5 * (1 + cos(pi * s)))`` with ``s = (step - warmup) / (steps - warmup)`` and
``r = lr_min_ratio``; ``schedule="constant"`` keeps ``lr`` after the warmup.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["lr_schedule", "make_optimizer", "decay_mask"]


def lr_schedule(lr: float, steps: int, warmup_steps: int = 0, lr_min_ratio: float = 0.01, kind: str = "cosine"):
    """Return ``step -> learning rate`` (jit-compatible; ``step`` is the number of updates already applied)."""

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * step / max(warmup_steps, 1)
        if kind == "constant":
            after = jnp.asarray(lr, jnp.float32)
        elif kind == "cosine":
            s = jnp.clip((step - warmup_steps) / max(steps - warmup_steps, 1), 0.0, 1.0)
            after = lr * (lr_min_ratio + (1.0 - lr_min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * s)))
        else:
            raise ValueError(f"lr_schedule: kind must be 'cosine' or 'constant', got {kind!r}")
        return jnp.where(step < warmup_steps, warm, after)

    return fn


_NO_DECAY_WORDS = ("norm", "bias", "embed", "scale")


def decay_mask(params, mode: str = "all"):
    """Bool pytree like ``params``: True where weight decay applies.

    ``"all"``: every parameter (lingua builds AdamW on ``model.parameters()``).
    ``"no_norm_bias_embed"``: no decay on parameters whose path names a norm, a bias, a scale or the embedding table.
    """
    if mode == "all":
        return jax.tree.map(lambda _: True, params)
    if mode != "no_norm_bias_embed":
        raise ValueError(f"decay_mask: mode must be 'all' or 'no_norm_bias_embed', got {mode!r}")

    def keep(path, _):
        names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
        return not any(w in names for w in _NO_DECAY_WORDS)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim, steps: int):
    """Build the optax transformation from an ``OptimSection`` (see :mod:`canon_jax.train.config`).

    Order: clip by global norm (on the full, accumulated gradient) -> Adam moments -> decoupled weight decay
    (``lr * wd * param``, as torch.optim.AdamW) -> scale by ``-lr(step)``.
    Returns ``(tx, schedule)``.
    """
    sched = lr_schedule(optim.lr, steps, optim.warmup_steps, optim.lr_min_ratio, optim.schedule)
    parts = []
    if optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    parts.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps))
    if optim.weight_decay > 0:
        parts.append(optax.add_decayed_weights(optim.weight_decay, mask=lambda p: decay_mask(p, optim.decay)))
    parts.append(optax.scale_by_learning_rate(sched))
    return optax.chain(*parts), sched
