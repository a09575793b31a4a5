"""Tiny LlamaCanon on CPU: one forward pass and greedy generation, printing shapes, tokens and timings.

Run: ``python -m experiments.demo`` (from the repository root).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from canon_jax import runtime
from canon_jax.config import ModelConfig
from canon_jax.generate import generate
from canon_jax.losses import cross_entropy
from canon_jax.models import CausalLM


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--canon-set", default="ABCD")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    runtime.print_hint(jax.default_backend())

    config = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        canon_set=args.canon_set,
        rope_dim=args.hidden // args.heads // 4,
        qk_norm=True,
    )
    model = CausalLM(config)
    print(f"devices: {jax.devices()}  (JAX {jax.__version__})")
    print(
        f"config: {config.num_layers}L x d{config.hidden_size}, {config.num_heads} heads, "
        f"canon_set={config.canon_set!r}, rope_dim={config.rope_dim}, ffn={config.ffn_dim()}"
    )

    ids = jax.random.randint(jax.random.key(1), (2, args.seq), 0, config.vocab_size)
    t = time.perf_counter()
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    jax.block_until_ready(params)
    n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
    print(f"init: {n_params:,} parameters in {time.perf_counter() - t:.2f}s")

    forward = jax.jit(model.apply)
    t = time.perf_counter()
    logits = jax.block_until_ready(forward({"params": params}, ids))
    t_compile = time.perf_counter() - t
    t = time.perf_counter()
    logits = jax.block_until_ready(forward({"params": params}, ids))
    t_run = time.perf_counter() - t
    loss, _ = cross_entropy(logits[:, :-1], ids[:, 1:])
    print(
        f"forward: input {ids.shape} -> logits {logits.shape} {logits.dtype}; loss {float(loss):.3f} "
        f"(~ln V = {np.log(config.vocab_size):.3f}); compile {t_compile:.2f}s, run {t_run:.4f}s"
    )

    prompt = ids[:, :8]
    t = time.perf_counter()
    out = jax.block_until_ready(generate(model, params, prompt, args.new_tokens))
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    out = jax.block_until_ready(generate(model, params, prompt, args.new_tokens))
    t_run = time.perf_counter() - t
    print(
        f"greedy generation: prompt {prompt.shape} -> new tokens {out.shape}; first call {t_first:.2f}s "
        f"(compile), then {t_run:.4f}s ({args.new_tokens * prompt.shape[0] / t_run:.0f} tokens/s)"
    )
    for row in np.asarray(out):
        print("  ", row.tolist())


if __name__ == "__main__":
    main()
