"""The pre-norm residual block shared by every architecture.

``h = x + Mixer(CanonA(RMSNorm(x)))``; ``x_next = h + MLP(CanonC(RMSNorm(h)))`` with Canon-D inside the MLP. The mixer
comes from the registry (``config.arch``); ``config.use_mlp=False`` drops the MLP half.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from canon_jax.config import ModelConfig
from canon_jax.layers.canon import canon_from_config, canon_site
from canon_jax.layers.mlp import MLP
from canon_jax.layers.norm import RMSNorm
from canon_jax.models.registry import get_mixer

__all__ = ["Block"]

_ACT = ("batch", "length", "embed")
_NORM_NAMES = {"A": "attn_norm", "C": "mlp_norm"}  # the norm before each of the block's own Canon positions


class Block(nn.Module):
    """One layer on ``x: [batch, time, d]``; returns ``(x_next, None)`` so that it can be ``nn.scan``-ned.

    ``decode`` is a module attribute (not a call argument) so that ``nn.scan``/``nn.remat`` see only array inputs.
    """

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, token_mask=None):
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        seg = segment_ids if cfg.segment_aware else None

        def norm_canon(mdl, h, seg, token_mask, letter):
            h = RMSNorm(cfg.norm_eps, "embed", pdt, name=_NORM_NAMES[letter])(h)
            if cfg.has_canon(letter):
                h = canon_from_config(cfg, letter)(h, segment_ids=seg, token_mask=token_mask, decode=self.decode)
            return h

        a = canon_site(cfg, self.decode, partial(norm_canon, letter="A"), "A")(self, x, seg, token_mask)
        y = get_mixer(cfg.arch)(cfg, name="mixer")(
            a, positions=positions, segment_ids=segment_ids, token_mask=token_mask, decode=self.decode
        )
        x = nn.with_logical_constraint(x + y.astype(x.dtype), _ACT)
        if cfg.use_mlp:
            c = canon_site(cfg, self.decode, partial(norm_canon, letter="C"), "C")(self, x, seg, token_mask)
            y = MLP(cfg, fused=cfg.arch != "llama", name="mlp")(
                c, segment_ids=segment_ids, token_mask=token_mask, decode=self.decode
            )
            x = nn.with_logical_constraint(x + y.astype(x.dtype), _ACT)
        return x, None
