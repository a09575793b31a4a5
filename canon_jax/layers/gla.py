"""GLA5: the gated-linear-attention mixer of Physics of Language Models Part 4.2, with Canon-b and Canon-B.

``x: [batch, time, d]`` ->

1. ``q = Wq x`` (d -> key_dim), ``k = Wk x`` (d -> key_dim), ``v = Wv x`` (d -> value_dim), no biases.
2. Canon-b (``"b"`` in canon_set): q, k, v each through their own short conv (SiLU, no residual, no bias,
   N(0, 0.02)); without ``b`` just SiLU. Canon-B (``"B"``): a residual Canon on ``concat[q, k, v]`` (a variant the
   official GLA code does not offer). Both are :class:`canon_jax.layers.canon.Canon`.
3. Forget gate: ``log_gate = logsigmoid(low_rank(x)) / gate_logit_normalizer`` per key channel (rank 16, bias on the
   second factor).
4. ``o = gla(q, k, v, log_gate)`` per head (scale ``head_k_dim ** -0.5``).
5. Output gate: ``o = RMSNorm_head(o) * SiLU(low_rank(x))`` (norm weight ``[head_v_dim]`` shared by the heads),
   then ``Wo`` (value_dim -> d).

Masked tokens (``token_mask`` False, left padding) zero the conv inputs and get log-gate 0 and k = 0, i.e. an identity
transition, so they influence no later token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from canon_jax.config import ModelConfig
from canon_jax.layers.canon import canon_from_config
from canon_jax.layers.dense import LowRankLinear, compute_dtype, dense
from canon_jax.layers.init import normal_init
from canon_jax.layers.masking import mask_tokens
from canon_jax.layers.norm import rms_norm
from canon_jax.layers.recurrent import check_linear_call, recurrent_cache
from canon_jax.ops.gla import gla, gla_step

__all__ = ["GLAMixer", "project_qkv", "output_block"]


def project_qkv(cfg: ModelConfig, x, *, segment_ids, token_mask, decode):
    """q, k, v projections + Canon-b (or SiLU) + Canon-B, shared by GLA5 and GDN2. Must be called from a compact
    method (the submodules attach to the calling module). Returns ``[B, T, key_dim]`` x2 and ``[B, T, value_dim]``."""
    init = normal_init(cfg.init_std)
    q = dense(cfg, cfg.key_dim, ("embed", "key"), "q_proj", init=init)(x)
    k = dense(cfg, cfg.key_dim, ("embed", "key"), "k_proj", init=init)(x)
    v = dense(cfg, cfg.value_dim, ("embed", "value"), "v_proj", init=init)(x)
    seg = segment_ids if cfg.segment_aware else None
    if cfg.has_canon("b"):
        q, k, v = (
            canon_from_config(cfg, "b", name, channel_axis=axis)(
                t, segment_ids=seg, token_mask=token_mask, decode=decode
            )
            for name, t, axis in (("q_conv1d", q, "key"), ("k_conv1d", k, "key"), ("v_conv1d", v, "value"))
        )
    else:
        q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
    if cfg.has_canon("B"):  # on concat(q, k, v), computed part by part
        q, k, v = canon_from_config(cfg, "B")([q, k, v], segment_ids=seg, token_mask=token_mask, decode=decode)
    return q, k, v


class GLAMixer(nn.Module):
    """GLA5 token mixer: ``[batch, time, d] -> [batch, time, d]``. See the module docstring."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, token_mask=None, decode: bool = False):
        del positions  # position-free mixer
        cfg = self.config
        check_linear_call(cfg, x, segment_ids, "GLAMixer")
        bsz, t, _ = x.shape
        h = cfg.num_heads
        dk, dv = cfg.key_dim // h, cfg.value_dim // h
        q, k, v = project_qkv(cfg, x, segment_ids=segment_ids, token_mask=token_mask, decode=decode)
        std = cfg.init_std**0.5 / cfg.gate_low_rank**0.25  # zeyuan_split_init
        gk = LowRankLinear(
            cfg.key_dim,
            cfg.gate_low_rank,
            ("embed", "key"),
            use_bias=True,
            factor_std=std,
            dtype=compute_dtype(cfg),
            param_dtype=jnp.dtype(cfg.param_dtype),
            name="gk_proj",
        )(x)
        log_gate = jax.nn.log_sigmoid(gk.astype(jnp.float32)) / cfg.gate_logit_normalizer
        # identity transition at masked steps: no decay, no write
        log_gate = mask_tokens(log_gate, token_mask)
        k = mask_tokens(k, token_mask)
        q, k, log_gate = (a.reshape(bsz, t, h, dk) for a in (q, k, log_gate))
        v = v.reshape(bsz, t, h, dv)

        cache, is_init = recurrent_cache(self, (bsz, h, dk, dv), decode)
        if cache is not None and not is_init and t == 1:
            o, state = gla_step(q[:, 0], k[:, 0], v[:, 0], log_gate[:, 0], cache.value)
            o = o[:, None]
        else:
            o, state = gla(
                q,
                k,
                v,
                log_gate,
                initial_state=None if is_init else cache.value,
                chunk_size=cfg.linear_chunk_size,
                impl=cfg.kernel_impl,
            )
        if cache is not None and not is_init:
            cache.value = state
        return output_block(self, cfg, x, o)


def output_block(module: nn.Module, cfg: ModelConfig, x, o):
    """``Wo(RMSNorm_head(o) * SiLU(g))`` with the rank-``output_gate_rank`` gate ``g = low_rank(x)``;
    ``o: [B, T, H, head_v_dim]`` -> ``[B, T, d]``. Called from a compact method (GLA5 and GDN2)."""
    b, t, h, dv = o.shape
    o = checkpoint_name(o, "mixer")  # for the remat policies (canon_jax.models.causal_lm.REMAT_POLICIES)
    dtype = compute_dtype(cfg)
    pdt = jnp.dtype(cfg.param_dtype)
    std = cfg.init_std**0.5 / cfg.output_gate_rank**0.25  # zeyuan_split_init
    g = LowRankLinear(
        cfg.value_dim,
        cfg.output_gate_rank,
        ("embed", "value"),
        use_bias=True,
        factor_std=std,
        dtype=dtype,
        param_dtype=pdt,
        name="g_proj",
    )(x)
    norm_w = module.param(
        "o_norm", nn.with_logical_partitioning(nn.initializers.ones_init(), ("head_dim",)), (dv,), pdt
    )
    y = rms_norm(o, norm_w, cfg.norm_eps, out_dtype=jnp.float32) * jax.nn.silu(g.astype(jnp.float32)).reshape(
        b, t, h, dv
    )
    y = y.reshape(b, t, h * dv).astype(dtype)
    return dense(cfg, cfg.hidden_size, ("value", "embed"), "o_proj", init=normal_init(cfg.init_std))(y)
