"""Grouped-query causal self-attention with QK-norm and Canon-B (the Llama mixer of Physics of Language Models 4.1).

Order of operations (as in the official LlamaCanon): ``q, k, v`` projections (no biases) -> optional RMSNorm over the
*whole* q and k projections (one weight of width ``H*hd`` / ``H_kv*hd``) -> optional Canon-B on ``concat(q, k, v)``
-> split into heads -> (partial) RoPE on q and k -> causal softmax attention with scale ``hd^-1/2`` -> output
projection.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from canon_jax.config import ModelConfig
from canon_jax.layers.canon import canon_from_config, canon_site
from canon_jax.layers.dense import Kernel, compute_dtype, dense, fused_projection
from canon_jax.layers.init import weight_init
from canon_jax.layers.norm import RMSNorm
from canon_jax.layers.rope import apply_rope, default_rope_tables, rope_tables
from canon_jax.ops.attention import flash_attention

__all__ = ["Attention", "dot_product_attention", "causal_attention"]

_NEG = float(jnp.finfo(jnp.float32).min)


def dot_product_attention(q, k, v, allowed):
    """Softmax attention with grouped KV heads.

    Args:
      q: ``[batch, time, heads, hd]``; k, v: ``[batch, keys, kv_heads, hd]`` (``heads`` a multiple of ``kv_heads``;
        query head ``h`` uses KV head ``h // (heads // kv_heads)``, as HF ``repeat_kv``).
      allowed: bool ``[batch, time, keys]``, True where the query may attend the key.
    Returns:
      ``[batch, time, heads, hd]`` in ``q.dtype``; scores and softmax in float32, scale ``hd^-1/2``. A query with no
      allowed key (only possible at masked padding positions) gets a uniform average instead of NaN.
    """
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * (hd**-0.5)
    scores = jnp.where(allowed[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


def causal_attention(q, k, v, *, key_valid=None, segment_ids=None, block_size: int = 128, max_blocks: int = 16):
    """Causal softmax attention over one sequence from position 0 (training, prefill), skipping masked key blocks.

    Equal to ``dot_product_attention(q, k, v, allowed)`` with ``allowed[b, t, s] = (s <= t) & key_valid[b, s]
    (& segment_ids[b, t] == segment_ids[b, s])`` for every query that may attend at least one key. The queries are
    cut into blocks of ``max(block_size, ceil(T / max_blocks))`` rows; block ``i`` is scored only against the keys up
    to its own last row, so the masked upper triangle is never computed (``(n + 1) / (2n)`` of the full score
    FLOPs and softmax work for ``n`` blocks: 62 % at T = 512), and the causal mask is built from iotas instead of a
    ``[batch, T, T]`` array. Each block's softmax is exact (it sees every key the query may attend). A query with
    no allowed key (only leading padding) gets a uniform average over its causal prefix.

    Args:
      q: ``[batch, time, heads, hd]``; k, v: ``[batch, time, kv_heads, hd]`` (GQA as in ``dot_product_attention``).
      key_valid: optional bool ``[batch, time]``, False keys are never attended.
      segment_ids: optional int ``[batch, time]``; a query attends only keys of its own segment.
    Returns:
      ``[batch, time, heads, hd]`` in ``q.dtype`` (scores and softmax in float32, scale ``hd^-1/2``).
    """
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    g = h // kvh
    bq = max(block_size, -(-t // max_blocks))
    # head-major [batch, kv_heads, group, time, hd] (one transpose each way) keeps every block's two matmuls plain
    # batched GEMMs; with one query head per KV head the group axis is a free reshape
    qh = jnp.transpose(q.reshape(b, t, kvh, g, hd), (0, 2, 3, 1, 4))
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [batch, kv_heads, time, hd]
    outs = []
    for lo in range(0, t, bq):
        hi = min(t, lo + bq)
        scores = jnp.einsum(
            "bkgtd,bksd->bkgts", qh[:, :, :, lo:hi], kh[:, :, :hi], preferred_element_type=jnp.float32
        ) * (hd**-0.5)
        allowed = (
            lo + jax.lax.broadcasted_iota(jnp.int32, (hi - lo, hi), 0)
            >= jax.lax.broadcasted_iota(jnp.int32, (hi - lo, hi), 1)
        )[None, None, None]
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, None, None, :hi]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, None, None, lo:hi, None] == segment_ids[:, None, None, None, :hi])
        probs = jax.nn.softmax(jnp.where(allowed, scores, _NEG), axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs, vh[:, :, :hi]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, hd)


class Attention(nn.Module):
    """The Llama mixer: ``x: [batch, time, d]`` -> ``[batch, time, d]``.

    Mixer signature shared by every architecture: ``__call__(x, *, positions, segment_ids, token_mask, decode)``.

    * ``positions``: int ``[batch, time]``, RoPE positions (default ``0..T-1``, or continuing the cache in decode).
    * ``segment_ids``: int ``[batch, time]``; used (attention and Canon-B) only when ``config.segment_aware``.
    * ``token_mask``: bool ``[batch, time]``; False keys are never attended and Canon-B inputs are zeroed there.
    * ``decode``: use the ``"cache"`` collection (``cached_key``/``cached_value`` ``[batch, max_len, kv_heads, hd]``,
      ``cached_mask`` ``[batch, max_len]``, ``cache_index`` scalar). The first (init) call only creates the cache
      with ``max_len`` = the input length.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, *, positions=None, segment_ids=None, token_mask=None, decode: bool = False):
        cfg = self.config
        b, t, d = x.shape
        h, kvh, hd = cfg.num_heads, cfg.kv_heads, cfg.head_size
        dt, pdt = compute_dtype(cfg), jnp.dtype(cfg.param_dtype)

        def proj(width, axis, name):
            return fused_projection(x, [Kernel((d, width), ("embed", axis), weight_init(cfg, d), pdt, name=name)()], dt)

        q = proj(h * hd, "heads", "q_proj")
        k = proj(kvh * hd, "kv_heads", "k_proj")
        v = proj(kvh * hd, "kv_heads", "v_proj")
        seg = segment_ids if cfg.segment_aware else None

        def norm_canon(mdl, q, k, v, seg, token_mask):
            if cfg.qk_norm:  # over the whole q and k projections (one weight each), before Canon-B
                q = RMSNorm(cfg.norm_eps, "heads", pdt, name="q_norm")(q)
                k = RMSNorm(cfg.norm_eps, "kv_heads", pdt, name="k_norm")(k)
            if cfg.has_canon("B"):  # on concat(q, k, v), computed part by part
                q, k, v = canon_from_config(cfg, "B")([q, k, v], segment_ids=seg, token_mask=token_mask, decode=decode)
            return q, k, v

        q, k, v = canon_site(cfg, decode, norm_canon, "B")(self, q, k, v, seg, token_mask)
        q = q.reshape(b, t, h, hd)
        k = k.reshape(b, t, kvh, hd)
        v = v.reshape(b, t, kvh, hd)

        initialized = decode and self.has_variable("cache", "cache_index")
        if decode:
            ck = self.variable("cache", "cached_key", jnp.zeros, (b, t, kvh, hd), k.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, (b, t, kvh, hd), v.dtype)
            cm = self.variable("cache", "cached_mask", jnp.zeros, (b, t), jnp.bool_)
            ci = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        rope_dim = cfg.effective_rope_dim
        rope_kw = dict(rope_dim=rope_dim, theta=cfg.rope_theta, version=cfg.rope_version)
        if positions is None and not initialized:  # 0..t-1 for every sequence: constant tables
            positions = jnp.arange(t, dtype=jnp.int32)[None]
            if rope_dim:
                rope_kw["tables"] = default_rope_tables(t, rope_dim, cfg.rope_theta)
        elif positions is None:  # continuing the cache
            positions = (ci.value + jnp.arange(t, dtype=jnp.int32))[None]
        if rope_dim and "tables" not in rope_kw:
            rope_kw["tables"] = rope_tables(positions, rope_dim, cfg.rope_theta)  # shared by q and k
        q = apply_rope(q, positions, **rope_kw)
        k = apply_rope(k, positions, **rope_kw)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        valid = jnp.ones((b, t), jnp.bool_) if token_mask is None else token_mask.astype(jnp.bool_)

        if initialized:
            if seg is not None:
                raise NotImplementedError(
                    "Attention: segment-aware masking is not supported in decode mode; "
                    "pass segment_ids=None when decoding"
                )
            max_len = ck.value.shape[1]
            idx = ci.value
            ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, idx, 0, 0))
            cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, idx, 0, 0))
            cm.value = jax.lax.dynamic_update_slice(cm.value, valid, (0, idx))
            ci.value = idx + t
            q_idx = idx + jnp.arange(t)
            causal = q_idx[:, None] >= jnp.arange(max_len)[None, :]
            allowed = causal[None] & cm.value[:, None, :]
            out = dot_product_attention(q, ck.value.astype(dt), cv.value.astype(dt), allowed)
        else:
            key_valid = None if token_mask is None else valid
            out = flash_attention(cfg.attention_impl, q, k, v, segment_ids=seg, key_valid=key_valid)
            if out is None:  # the XLA path
                out = causal_attention(q, k, v, key_valid=key_valid, segment_ids=seg)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = checkpoint_name(out, "mixer")  # for the remat policies (canon_jax.models.causal_lm.REMAT_POLICIES)
        return dense(cfg, d, ("heads", "embed"), "o_proj", init=weight_init(cfg, d))(out.reshape(b, t, h * hd))
