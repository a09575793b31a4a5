"""``CausalLM``: embedding -> blocks -> final RMSNorm -> (tied or untied) head, float32 logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from canon_jax.config import ModelConfig
from canon_jax.layers.dense import compute_dtype, dense
from canon_jax.layers.init import embedding_init, weight_init
from canon_jax.layers.norm import RMSNorm
from canon_jax.models.blocks import Block
from canon_jax.models.registry import get_mixer

__all__ = ["CausalLM", "init_cache", "REMAT_POLICIES"]

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute everything in the backward pass
    "save_dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the element-wise rest
    # keep what is costly to recompute per byte: the Canon outputs and the token mixer's core output (attention or
    # the linear recurrence), named with jax.ad_checkpoint.checkpoint_name in canon_jax.layers
    "save_canon_attn": jax.checkpoint_policies.save_only_these_names("canon", "mixer"),
}


class CausalLM(nn.Module):
    """Causal language model for any ``config.arch`` (the mixer comes from :mod:`canon_jax.models.registry`).

    ``__call__(input_ids [batch, time] int, *, segment_ids=None, positions=None, token_mask=None, decode=False)``
    returns float32 logits ``[batch, time, vocab]``.

    * ``segment_ids`` (int, 0 = padding, documents from 1) is used only when ``config.segment_aware``.
    * ``positions`` default to ``0..T-1`` (or continue the cache when decoding).
    * ``token_mask`` (bool, None = all valid): masked tokens never influence later tokens (left padding).
    * ``decode=True`` reads/writes the ``"cache"`` collection (see :func:`init_cache`).
    * ``return_hidden=True`` skips the head and returns ``(hidden, head, head_layout)``: the final-norm output
      ``[batch, time, d]`` in the compute dtype and the head weight, ``[d, vocab]`` (``"dv"``) or the tied embedding
      ``[vocab, d]`` (``"vd"``), for :func:`canon_jax.losses.chunked_cross_entropy`.
    """

    config: ModelConfig

    def _check(self, input_ids, segment_ids, positions, token_mask):
        if input_ids.ndim != 2:
            raise ValueError(f"CausalLM: input_ids must be [batch, time], got shape {input_ids.shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"CausalLM: input_ids must be integers, got dtype {input_ids.dtype}")
        for name, v in (("segment_ids", segment_ids), ("positions", positions), ("token_mask", token_mask)):
            if v is not None and v.shape != input_ids.shape:
                raise ValueError(f"CausalLM: {name} must have the shape of input_ids {input_ids.shape}, got {v.shape}")

    @nn.compact
    def __call__(
        self,
        input_ids,
        *,
        segment_ids=None,
        positions=None,
        token_mask=None,
        decode: bool = False,
        return_hidden: bool = False,
    ):
        cfg = self.config
        self._check(input_ids, segment_ids, positions, token_mask)
        get_mixer(cfg.arch)  # fail early with a clear error for an arch without a mixer
        dt, pdt = compute_dtype(cfg), jnp.dtype(cfg.param_dtype)
        d = cfg.hidden_size
        embed = nn.Embed(
            cfg.vocab_size,
            d,
            dtype=dt,
            param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(embedding_init(cfg), ("vocab", "embed")),
            name="embed",
        )
        x = embed(input_ids.astype(jnp.int32))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        # positions=None reaches the mixers as None: attention then uses 0..T-1 (or continues its cache) with RoPE
        # tables computed once on the host
        if token_mask is not None:
            token_mask = token_mask.astype(jnp.bool_)

        block_cls = Block
        if cfg.remat != "none":
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(cfg, decode, name="layers")(x, positions, segment_ids, token_mask)
        else:
            for i in range(cfg.num_layers):
                x, _ = block_cls(cfg, decode, name=f"layers_{i}")(x, positions, segment_ids, token_mask)

        x = RMSNorm(cfg.norm_eps, "embed", pdt, name="final_norm")(x)
        if return_hidden:
            if self.is_initializing():
                raise ValueError("CausalLM: return_hidden=True needs initialised parameters (init without it)")
            params = self.variables["params"]
            if cfg.tie_embeddings:
                return x.astype(dt), nn.meta.unbox(params["embed"]["embedding"]), "vd"
            return x.astype(dt), nn.meta.unbox(params["lm_head"]["kernel"]), "dv"
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head", init=weight_init(cfg, d))(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)


def init_cache(model: CausalLM, batch: int, max_len: int):
    """Zero decoding cache for ``batch`` sequences of up to ``max_len`` tokens (prompt + generated).

    Returns the ``"cache"`` collection (KV caches, Canon states for every site and layer) without computing params.
    """
    if batch < 1 or max_len < 1:
        raise ValueError(f"init_cache: batch and max_len must be >= 1, got {batch}, {max_len}")
    ids = jnp.zeros((batch, max_len), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, decode=True))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
