"""Mamba2 mixer of Physics of Language Models Part 4.2 (with Canon-b = its own conv1d, Canon-B, and the ``noconv1d``
ablation).

``x: [batch, time, d]``, inner width ``di = 2 d``, ``H`` heads of ``P = di / H``, state ``N``, ``G`` groups:

1. ``in_proj``: d -> ``[z (di) | xBC (di + 2 G N) | dt (H)]`` (no bias). Canon-B (``"B"``): a residual Canon on the
   whole in_proj output.
2. Canon-b (``"b"``): depthwise conv1d (K = conv_size, with bias, SiLU) on xBC. Without ``b`` (``noconv1d``) the conv
   is the identity kernel ``[0, .., 0, 1]`` with **no bias and no SiLU** — no parameter is created.
3. ``dt = softplus(dt + dt_bias)``, ``A = -exp(A_log)``; ``y = ssd(x, dt, A, B, C, D)``.
4. Gated RMSNorm over the full ``di`` width: ``y = RMSNorm(y * SiLU(z))``; ``out_proj``: di -> d (no bias).

Inits: linears PyTorch default U(+-1/sqrt(fan_in)); conv1d weight and bias U(+-1/sqrt(K)); ``A ~ U(1, 16)``; ``D = 1``;
``dt_bias = softplus^-1(dt)``, dt log-uniform in [1e-3, 0.1] floored at 1e-4; norm weight 1. (The Mamba2 embedding is
N(0, 0.1) in the official code; that belongs to the model's embedding init.) Masked tokens get ``dt = 0`` (identity
transition, no input) and zeroed conv / Canon-B inputs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from canon_jax.config import ModelConfig
from canon_jax.layers.canon import canon_from_config
from canon_jax.layers.dense import compute_dtype, dense
from canon_jax.layers.init import a_log_init, dt_bias_init, torch_default_init
from canon_jax.layers.masking import mask_tokens
from canon_jax.layers.norm import rms_norm
from canon_jax.layers.recurrent import check_linear_call, recurrent_cache
from canon_jax.ops.ssd import ssd, ssd_step

__all__ = ["Mamba2Mixer", "mamba2_dims"]


def mamba2_dims(cfg: ModelConfig) -> dict:
    """Widths of the Mamba2 mixer: inner ``di``, heads ``H``, head dim ``P``, state ``N``, groups ``G``, conv width and
    in_proj width."""
    di = 2 * cfg.hidden_size
    h = cfg.num_heads
    p = cfg.mamba_head_dim or di // h
    n, g = cfg.ssm_state_size, cfg.ssm_groups
    conv_dim = di + 2 * g * n
    return dict(di=di, heads=h, head_dim=p, state=n, groups=g, conv_dim=conv_dim, in_proj=di + conv_dim + h)


class Mamba2Mixer(nn.Module):
    """Mamba2 token mixer: ``[batch, time, d] -> [batch, time, d]``. See the module docstring."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, token_mask=None, decode: bool = False):
        del positions  # position-free mixer
        cfg = self.config
        check_linear_call(cfg, x, segment_ids, "Mamba2Mixer")
        dims = mamba2_dims(cfg)
        di, h, p, n, g = dims["di"], dims["heads"], dims["head_dim"], dims["state"], dims["groups"]
        bsz, t, _ = x.shape
        pdt = jnp.dtype(cfg.param_dtype)
        seg = segment_ids if cfg.segment_aware else None

        in_init = torch_default_init(cfg.hidden_size)
        zxbcdt = dense(cfg, dims["in_proj"], ("embed", "qkv"), "in_proj", init=in_init)(x)
        if cfg.has_canon("B"):
            zxbcdt = canon_from_config(cfg, "B")(zxbcdt, segment_ids=seg, token_mask=token_mask, decode=decode)
        z, xbc, dt = jnp.split(zxbcdt, [di, di + dims["conv_dim"]], axis=-1)
        if cfg.has_canon("b"):
            conv = canon_from_config(cfg, "b", "conv1d")
            xbc = conv(xbc, segment_ids=seg, token_mask=token_mask, decode=decode)
        # noconv1d: identity kernel, no bias, no activation -> xBC passes through unchanged
        xs, bm, cm = jnp.split(xbc, [di, di + g * n], axis=-1)

        a_log = self.param("A_log", nn.with_logical_partitioning(a_log_init(1.0, 16.0), ("heads",)), (h,), pdt)
        dt_bias = self.param("dt_bias", nn.with_logical_partitioning(dt_bias_init(), ("heads",)), (h,), pdt)
        d_skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones_init(), ("heads",)), (h,), pdt)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        dt = mask_tokens(dt, token_mask)  # identity transition and no input at masked steps
        a = -jnp.exp(a_log.astype(jnp.float32))
        xs = xs.reshape(bsz, t, h, p)
        bm, cm = bm.reshape(bsz, t, g, n), cm.reshape(bsz, t, g, n)

        cache, is_init = recurrent_cache(self, (bsz, h, p, n), decode)
        if cache is not None and not is_init and t == 1:
            y, state = ssd_step(xs[:, 0], dt[:, 0], a, bm[:, 0], cm[:, 0], cache.value, D=d_skip)
            y = y[:, None]
        else:
            y, state = ssd(
                xs,
                dt,
                a,
                bm,
                cm,
                d_skip,
                initial_state=None if is_init else cache.value,
                chunk_size=cfg.mamba_chunk_size,
                impl=cfg.kernel_impl,
            )
            y = checkpoint_name(y, "mixer")  # for the remat policies (canon_jax.models.causal_lm.REMAT_POLICIES)
        if cache is not None and not is_init:
            cache.value = state

        norm_w = self.param("norm", nn.with_logical_partitioning(nn.initializers.ones_init(), ("value",)), (di,), pdt)
        y = y.reshape(bsz, t, di).astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        y = rms_norm(y, norm_w, cfg.norm_eps, out_dtype=compute_dtype(cfg))
        return dense(cfg, cfg.hidden_size, ("value", "embed"), "out_proj", init=torch_default_init(di))(y)
