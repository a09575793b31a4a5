"""Training-step benchmark: forward + backward + AdamW of LlamaCanon, Canon off vs ABCD.

Default shape (the issue's): 4 layers, hidden 256, 4 heads, seq 512, batch 8, vocab 512, float32.
Run: ``python -m experiments.bench_llama_step [--steps 10] [--repeats 3]``.
Reports the median ms/step over ``repeats`` timed windows of ``steps`` steps each (after a compile + warm-up step).
The windows of the configurations are interleaved, in the reverse order every other round (ABBA), so that a slow
drift of the machine's speed hits every configuration alike. The ratio of the last configuration to the first is
printed twice: as the ratio of their medians, and as the median over rounds of the ratio within each round (the
paired ratio, which cancels drift between rounds; on a shared VM it is the steadier of the two).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import optax

from canon_jax import runtime
from canon_jax.config import ModelConfig
from canon_jax.losses import cross_entropy
from canon_jax.models import CausalLM


def make_step(model, opt):
    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return cross_entropy(logits, batch["targets"])[0]

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # donate params and optimizer state: the update is written in place
    return jax.jit(step, donate_argnums=(0, 1))


def setup(canon_set, args):
    """Compiles the step for one canon_set; returns a closure running ``n`` steps and returning seconds per step."""
    config = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        canon_set=canon_set,
        kernel_impl=args.impl,
        remat=args.remat,
        scan_layers=args.scan,
    )
    model = CausalLM(config)
    key = jax.random.key(0)
    ids = jax.random.randint(key, (args.batch, args.seq + 1), 0, args.vocab)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
    params = jax.jit(model.init)(key, batch["inputs"])["params"]
    params = jax.tree.map(lambda x: x, __import__("flax").linen.unbox(params))
    opt = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)
    opt_state = opt.init(params)
    step = make_step(model, opt)
    t = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, batch)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t
    state = {"params": params, "opt_state": opt_state, "loss": loss}

    def run(n):
        """Runs n steps; returns (wall seconds, process CPU seconds) per step."""
        t, c = time.perf_counter(), time.process_time()
        p, o, l = state["params"], state["opt_state"], state["loss"]
        for _ in range(n):
            p, o, l = step(p, o, batch)
        jax.block_until_ready(l)
        state.update(params=p, opt_state=o, loss=l)
        return (time.perf_counter() - t) / n, (time.process_time() - c) / n

    run(1)  # warm-up
    return {"canon_set": canon_set or "none", "run": run, "compile_s": compile_s, "state": state, "times": []}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--scan", action="store_true")
    ap.add_argument("--canon-sets", default=",ABCD", help="comma-separated canon_set values to compare")
    args = ap.parse_args(argv)
    runtime.print_hint(jax.default_backend())
    print(
        f"JAX {jax.__version__} on {jax.devices()[0].platform}; {args.layers}L d{args.hidden} {args.heads}h "
        f"seq {args.seq} batch {args.batch} vocab {args.vocab} float32; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
    )
    results = [setup(cs, args) for cs in args.canon_sets.split(",")]
    # Alternate the timed windows between configurations (ABBA order) so that load changes hit all alike.
    for i in range(args.repeats):
        for r in results if i % 2 == 0 else results[::-1]:
            r["times"].append(r["run"](args.steps))
    tokens = args.batch * args.seq
    for r in results:
        r["ms_per_step"] = 1000 * statistics.median(w for w, _ in r["times"])
        r["cpu_ms_per_step"] = 1000 * statistics.median(c for _, c in r["times"])
        r["tokens_per_s"] = tokens / r["ms_per_step"] * 1000
        r["all_ms"] = [round(1000 * w, 1) for w, _ in r["times"]]
        r["loss"] = float(r["state"]["loss"])
    for r in results:
        print(
            f"canon_set={r['canon_set']:>5}: {r['ms_per_step']:8.1f} ms/step  {r['tokens_per_s']:8.0f} tokens/s  "
            f"CPU {r['cpu_ms_per_step']:8.1f} ms/step (compile {r['compile_s']:.1f}s, windows {r['all_ms']} ms, "
            f"loss {r['loss']:.3f})"
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        paired = [statistics.median(b[k] / a[k] for a, b in zip(first["times"], last["times"])) for k in (0, 1)]
        print(
            f"ratio {last['canon_set']} / {first['canon_set']}: wall "
            f"{last['ms_per_step'] / first['ms_per_step']:.3f}x, CPU time "
            f"{last['cpu_ms_per_step'] / first['cpu_ms_per_step']:.3f}x (ratio of medians); paired: wall "
            f"{paired[0]:.3f}x, CPU time {paired[1]:.3f}x (median over {args.repeats} rounds)"
        )


if __name__ == "__main__":
    main()
