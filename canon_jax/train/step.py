"""The training step: loss of a (micro-)batch, gradients, optimizer update.

``build_train_step(model, cfg, tx, schedule)`` returns ``step(state, batch) -> (state, metrics)`` (not jitted; the
:class:`~canon_jax.train.trainer.Trainer` jits it with the state and batch shardings). Train state:
``{"step": int32 [], "params": pytree, "opt_state": optax state}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from canon_jax.losses import chunked_cross_entropy, cross_entropy
from canon_jax.train import sharding as shd
from canon_jax.train.config import ExperimentConfig

__all__ = ["build_train_step", "model_loss"]


def model_loss(model, params, batch, mask, chunk_size: int, z_loss: str = "none", z_loss_weight: float = 0.0):
    """``(loss, aux)`` of :func:`canon_jax.losses.cross_entropy` for the model on a batch; with ``chunk_size > 0``
    from the hidden states and head weight (:func:`canon_jax.losses.chunked_cross_entropy`), never materialising the
    float32 logits."""
    kwargs = {}
    if model.config.segment_aware:
        # The paper's recipe trains with plain causal attention and window positions across packed documents; the
        # document structure is only used when segment-aware masking is switched on.
        kwargs = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}
    if chunk_size:
        hidden, head, layout = model.apply({"params": params}, batch["inputs"], return_hidden=True, **kwargs)
        return chunked_cross_entropy(
            hidden,
            head,
            batch["targets"],
            mask,
            head_layout=layout,
            chunk_size=chunk_size,
            z_loss=z_loss,
            z_loss_weight=z_loss_weight,
        )
    logits = model.apply({"params": params}, batch["inputs"], **kwargs)
    return cross_entropy(logits, batch["targets"], mask, z_loss=z_loss, z_loss_weight=z_loss_weight)


def build_train_step(model, cfg: ExperimentConfig, tx, schedule, mesh=None, param_shardings=None):
    """``step(state, batch) -> (state, metrics)`` (not jitted). ``metrics``: loss, nll, grad_norm, lr, tokens,
    nonfinite (bool ``[number of parameter arrays]`` in ``jax.tree.leaves(params)`` order: that array's gradient has a
    non-finite entry).

    ``param_shardings`` (the parameters' shardings): gradients are constrained to them as soon as they are computed,
    so that under FSDP each weight gradient is reduce-scattered to its shard instead of all-reduced in full on every
    device (and micro-batch gradients are accumulated as shards).
    """
    accum = cfg.train.grad_accum

    def shard_like_params(tree):
        return tree if param_shardings is None else jax.lax.with_sharding_constraint(tree, param_shardings)

    def loss_terms(params, batch, total_tokens):
        # cross_entropy is a masked mean (0 for an all-masked micro-batch): weight it by this micro-batch's share of
        # the batch's tokens so that micro-batch terms sum to the full batch's token mean.
        mask = batch["loss_mask"].astype(jnp.float32)
        loss, aux = model_loss(
            model, params, batch, mask, cfg.train.loss_chunk_size, cfg.optim.z_loss, cfg.optim.z_loss_weight
        )
        w = mask.sum() / total_tokens
        return loss * w, aux["nll"] * w

    def split(x):  # [B, ...] -> [accum, B/accum, ...] keeping each device's rows on the device
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, P(None, ("data", "fsdp"), *([None] * (x.ndim - 2))))
            )
        return x

    def step_fn(state, batch):
        params = state["params"]
        total = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
        value_and_grad = jax.value_and_grad(lambda p, b: loss_terms(p, b, total), has_aux=True)

        def grad_fn(p, b):
            out, g = value_and_grad(p, b)
            return out, shard_like_params(g)

        if accum == 1:
            (loss, nll), grads = grad_fn(params, batch)
        else:

            def body(carry, mb):
                (l, n), g = grad_fn(params, mb)
                return (carry[0] + l, carry[1] + n, jax.tree.map(jnp.add, carry[2], g)), None

            zeros = shard_like_params(jax.tree.map(jnp.zeros_like, params))
            zero = jnp.zeros((), jnp.float32)
            (loss, nll, grads), _ = jax.lax.scan(body, (zero, zero, zeros), jax.tree.map(split, batch))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}
        metrics = {
            "loss": loss,
            "nll": nll,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
            "tokens": batch["loss_mask"].astype(jnp.float32).sum(),
            "nonfinite": jnp.stack([~jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]),
        }
        return new_state, metrics

    if mesh is None:
        return step_fn

    def step_in_mesh(state, batch):
        # The mesh and the logical rules at trace time, whoever jits or lowers the step: the model's sharding
        # annotations and the kernels' shard_map read them, and the kernels pick their implementation from the
        # mesh's devices.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
            return step_fn(state, batch)

    return step_in_mesh
