"""GDN2: the Gated DeltaNet mixer of Physics of Language Models Part 4.2, with Canon-b and Canon-B.

``x: [batch, time, d]`` ->

1. q, k (d -> key_dim), v (d -> value_dim); Canon-b short convs with SiLU (or plain SiLU); Canon-B residual Canon on
   ``concat[q, k, v]`` (width ``2 key_dim + value_dim``) — shared with GLA5 (:func:`canon_jax.layers.gla.project_qkv`).
2. ``beta = sigmoid(W_b x)`` and ``log_decay = -exp(A_log) * softplus(W_a x + dt_bias)``, one per head.
3. ``o = gated_delta_rule(q, k, v, log_decay, beta, use_qk_l2norm=True)`` (scale ``head_k_dim ** -0.5``).
4. ``Wo(RMSNorm_head(o) * SiLU(low_rank(x)))``.

Inits (fla / the official ``_init_weights``): linears and b-convs N(0, 0.02); ``A ~ U(0, 16)``, ``A_log = log A``;
``dt`` log-uniform in [1e-3, 0.1] floored at 1e-4 and ``dt_bias = softplus^-1(dt)``. Masked tokens get beta = 0 and
log_decay = 0 (identity transition) and zeroed conv inputs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from canon_jax.config import ModelConfig
from canon_jax.layers.dense import dense
from canon_jax.layers.gla import output_block, project_qkv
from canon_jax.layers.init import a_log_init, dt_bias_init, normal_init
from canon_jax.layers.masking import mask_tokens
from canon_jax.layers.recurrent import check_linear_call, recurrent_cache
from canon_jax.ops.gdn import gated_delta_rule, gated_delta_rule_step

__all__ = ["GDNMixer"]


class GDNMixer(nn.Module):
    """GDN2 token mixer: ``[batch, time, d] -> [batch, time, d]``. See the module docstring."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, token_mask=None, decode: bool = False):
        del positions  # position-free mixer
        cfg = self.config
        check_linear_call(cfg, x, segment_ids, "GDNMixer")
        bsz, t, _ = x.shape
        h = cfg.num_heads
        dk, dv = cfg.key_dim // h, cfg.value_dim // h
        pdt = jnp.dtype(cfg.param_dtype)
        q, k, v = project_qkv(cfg, x, segment_ids=segment_ids, token_mask=token_mask, decode=decode)
        init = normal_init(cfg.init_std)
        beta = jax.nn.sigmoid(dense(cfg, h, ("embed", "heads"), "b_proj", init=init)(x).astype(jnp.float32))
        a_log = self.param("A_log", nn.with_logical_partitioning(a_log_init(0.0, 16.0), ("heads",)), (h,), pdt)
        dt_bias = self.param("dt_bias", nn.with_logical_partitioning(dt_bias_init(), ("heads",)), (h,), pdt)
        a_in = dense(cfg, h, ("embed", "heads"), "a_proj", init=init)(x).astype(jnp.float32)
        log_decay = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(a_in + dt_bias.astype(jnp.float32))
        # identity transition at masked steps (the official code multiplies beta and g by the mask)
        beta, log_decay = mask_tokens(beta, token_mask), mask_tokens(log_decay, token_mask)
        q, k = q.reshape(bsz, t, h, dk), k.reshape(bsz, t, h, dk)
        v = v.reshape(bsz, t, h, dv)

        cache, is_init = recurrent_cache(self, (bsz, h, dk, dv), decode)
        if cache is not None and not is_init and t == 1:
            o, state = gated_delta_rule_step(
                q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], beta[:, 0], cache.value, use_qk_l2norm=True
            )
            o = o[:, None]
        else:
            o, state = gated_delta_rule(
                q,
                k,
                v,
                log_decay,
                beta,
                initial_state=None if is_init else cache.value,
                use_qk_l2norm=True,
                chunk_size=cfg.linear_chunk_size,
                impl=cfg.kernel_impl,
            )
        if cache is not None and not is_init:
            cache.value = state
        return output_block(self, cfg, x, o)
