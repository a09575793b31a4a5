"""Batched autoregressive generation with KV caches and Canon states (one jit-compiled prefill + ``lax.scan``)."""

from __future__ import annotations

import functools
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp

from canon_jax.config import ModelConfig
from canon_jax.models import CausalLM, init_cache

__all__ = ["generate", "prompt_positions"]


def prompt_positions(prompt_mask):
    """Positions of left-padded prompts: ``[batch, P]`` int32, 0 at each row's first real token (0 on padding)."""
    m = prompt_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


def _pick(logits, rng, greedy: bool, temperature, top_k: int | None):
    """Next token ``[batch]`` int32 from ``logits: [batch, vocab]``."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy", "top_k", "return_logits"))
def _generate(
    config: ModelConfig,
    params,
    prompt_ids,
    prompt_mask,
    temperature,
    rng,
    *,
    max_new_tokens: int,
    greedy: bool,
    top_k: int | None,
    return_logits: bool,
):
    model = CausalLM(config)
    b, p = prompt_ids.shape
    cache = init_cache(model, b, p + max_new_tokens)
    logits, state = model.apply(
        {"params": params, "cache": cache},
        prompt_ids,
        positions=prompt_positions(prompt_mask),
        token_mask=prompt_mask,
        decode=True,
        mutable=["cache"],
    )
    last = logits[:, -1, :]
    rng, sub = jax.random.split(rng)
    tok = _pick(last, sub, greedy, temperature, top_k)
    pos = jnp.sum(prompt_mask.astype(jnp.int32), axis=1)  # position of the first new token

    def step(carry, _):
        cache, tok, pos, rng = carry
        logits, state = model.apply(
            {"params": params, "cache": cache}, tok[:, None], positions=pos[:, None], decode=True, mutable=["cache"]
        )
        rng, sub = jax.random.split(rng)
        nxt = _pick(logits[:, 0, :], sub, greedy, temperature, top_k)
        return (state["cache"], nxt, pos + 1, rng), (nxt, logits[:, 0, :] if return_logits else None)

    # Step i consumes token i-1 and produces token i; the scan runs max_new_tokens - 1 times.
    _, (toks, step_logits) = jax.lax.scan(step, (state["cache"], tok, pos, rng), None, length=max_new_tokens - 1)
    tokens = jnp.concatenate([tok[:, None], jnp.swapaxes(toks, 0, 1)], axis=1)
    if not return_logits:
        return tokens, None
    all_logits = jnp.concatenate([last[:, None, :], jnp.swapaxes(step_logits, 0, 1)], axis=1)
    return tokens, all_logits


def generate(
    model,
    params,
    prompt_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng=None,
    prompt_mask=None,
    return_logits: bool = False,
):
    """Generates ``max_new_tokens`` tokens after each prompt.

    Args:
      model: a ``CausalLM``; params: its params (boxed or plain).
      prompt_ids: int ``[batch, P]``; left-padded when ``prompt_mask`` is given.
      max_new_tokens: number N of tokens to generate (>= 1).
      temperature: 0 = greedy (argmax); > 0 samples from ``softmax(logits / temperature)`` (needs ``rng``).
      top_k: sample only among the ``top_k`` most likely tokens.
      prompt_mask: bool ``[batch, P]``, True on real tokens (padding must be on the left); positions start at 0 at
        each row's first real token and padding never influences the output.
    Returns:
      int32 ``[batch, N]`` new tokens, and float32 ``[batch, N, vocab]`` logits that produced them if ``return_logits``.
    """
    prompt_ids = jnp.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"generate: prompt_ids must be [batch, P] with P >= 1, got shape {prompt_ids.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    greedy = temperature == 0
    if not greedy and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs rng=jax.random.key(...)")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"generate: top_k must be in [1, vocab_size={model.config.vocab_size}], got {top_k}")
    if top_k is not None and greedy:
        raise ValueError("generate: top_k only applies when sampling (temperature > 0)")
    if prompt_mask is None:
        prompt_mask = jnp.ones(prompt_ids.shape, jnp.bool_)
    else:
        prompt_mask = jnp.asarray(prompt_mask, jnp.bool_)
        if prompt_mask.shape != prompt_ids.shape:
            raise ValueError(f"generate: prompt_mask must be {prompt_ids.shape}, got {prompt_mask.shape}")
    rng = jax.random.key(0) if rng is None else rng
    tokens, logits = _generate(
        model.config,
        nn.unbox(params),
        prompt_ids.astype(jnp.int32),
        prompt_mask,
        jnp.asarray(temperature if not greedy else 1.0, jnp.float32),
        rng,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        top_k=top_k,
        return_logits=return_logits,
    )
    return (tokens, logits) if return_logits else tokens


class _CallableModule(types.ModuleType):
    """``canon_jax.generate`` is both this module and the function: importing the submodule makes Python bind the
    package attribute ``canon_jax.generate`` to the module, so the module forwards calls to :func:`generate`."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
