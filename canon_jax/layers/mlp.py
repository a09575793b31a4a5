"""Gated SwiGLU MLP with the optional Canon-D on ``concat(gate, up)``."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from canon_jax.config import ModelConfig
from canon_jax.layers.canon import canon_from_config, canon_site
from canon_jax.layers.dense import Kernel, compute_dtype, dense, fused_projection
from canon_jax.layers.init import weight_init

__all__ = ["MLP"]


class MLP(nn.Module):
    """``out = W2(SiLU(g) * u)`` with ``g = W1 x``, ``u = W3 x`` and Canon-D on ``concat(g, u)`` when enabled.

    ``x: [batch, time, d]`` -> ``[batch, time, d]``. ``fused=False`` keeps separate ``gate_proj``/``up_proj``
    (Hugging Face Llama names); ``fused=True`` uses one ``both_proj`` of width ``2 * ffn`` (the linear models' layout).
    Same math either way.
    """

    config: ModelConfig
    fused: bool = False

    @nn.compact
    def __call__(self, x, *, segment_ids=None, token_mask=None, decode: bool = False):
        cfg = self.config
        d, f = cfg.hidden_size, cfg.ffn_dim()
        dt, pdt = compute_dtype(cfg), jnp.dtype(cfg.param_dtype)

        if self.fused:
            w = Kernel((d, 2 * f), ("embed", "mlp"), weight_init(cfg, d), pdt, name="both_proj")()
            g, u = fused_projection(x, [w[:, :f]], dt), fused_projection(x, [w[:, f:]], dt)
        else:
            g, u = (
                fused_projection(x, [Kernel((d, f), ("embed", "mlp"), weight_init(cfg, d), pdt, name=n)()], dt)
                for n in ("gate_proj", "up_proj")
            )
        g = nn.with_logical_constraint(g, ("batch", "length", "mlp"))
        u = nn.with_logical_constraint(u, ("batch", "length", "mlp"))

        def canon_glu(mdl, g, u, seg, token_mask):
            if cfg.has_canon("D"):  # on concat(gate, up), computed part by part
                g, u = canon_from_config(cfg, "D")([g, u], segment_ids=seg, token_mask=token_mask, decode=decode)
            return nn.silu(g) * u

        seg = segment_ids if cfg.segment_aware else None
        h = canon_site(cfg, decode, canon_glu, "D")(self, g, u, seg, token_mask)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense(cfg, d, ("mlp", "embed"), "down_proj", init=weight_init(cfg, f))(h)
