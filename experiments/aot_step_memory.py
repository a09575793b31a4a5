"""Per-device memory and collectives of a compiled train step, by deviceless TPU compilation (no TPU needed).

Builds the real :class:`canon_jax.train.trainer.Trainer` of a preset on the abstract devices of a TPU topology,
lowers and compiles its step for a given per-device batch, and prints the compiler's memory analysis and the count
of gradient collectives in the compiled program::

    LIBTPU_INIT_ARGS=--xla_tpu_max_hbm_size_mib=200000 JAX_PLATFORMS=cpu python -m experiments.aot_step_memory \\
        configs/experiments/llama_canon_1b.yaml --topology v5e:16x16 --per-device-batch 4 \\
        --set model.kernel_impl=xla

``--set`` takes the config overrides of ``experiments.train``. Needs ``libtpu`` (``pip install "jax[tpu]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")


def collectives(hlo_text: str) -> list:
    """``(kind, result_shape_text)`` of every collective instruction in an optimised HLO module's text (async
    ``-start``/``-done`` pairs counted once, at the start).

    XLA:TPU writes a reduce-scatter as an ``all-reduce`` + ``dynamic-slice`` inside a fused computation named
    ``all-reduce-scatter.N``: those all-reduces count as ``reduce-scatter``.
    """
    out, computation = [], ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = line.split(" ", 1)[0]
        m = re.search(r" = (.*?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", line)
        if m:
            kind = m.group(2)
            if kind == "all-reduce" and computation.startswith("%all-reduce-scatter"):
                kind = "reduce-scatter"
            out.append((kind, m.group(1)))
    return out


def collective_counts(hlo_text: str) -> dict:
    """Instructions of each collective kind; ``<kind> (weights)``: those whose result holds a 2-D bf16/f32 matrix
    with both dimensions >= 64, i.e. a projection weight (not a low-rank gate factor such as ``[16, value]``, which
    is replicated and rightly all-reduced, nor a ``[1, C]`` row)."""
    counts = {k: 0 for k in COLLECTIVES}
    counts.update({f"{k} (weights)": 0 for k in COLLECTIVES})
    for kind, shape in collectives(hlo_text):
        counts[kind] += 1
        if any(min(int(a), int(b)) >= 64 for a, b in re.findall(r"\b(?:bf16|f32)\[(\d+),(\d+)\]", shape)):
            counts[f"{kind} (weights)"] += 1
    return counts


def compile_step(cfg, topology: str, per_device_batch: int):
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from canon_jax.train.trainer import BATCH_KEYS, Trainer

    # several deviceless compilations may run at once: libtpu's single-process lock protects real chips only
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    import dataclasses

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=per_device_batch * len(devices)))
    trainer = Trainer(cfg, devices=devices)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_state, trainer.state_shardings
    )
    shape = (cfg.train.batch_size, cfg.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=trainer.batch_sharding) for k in BATCH_KEYS}
    with trainer.context():
        lowered = trainer._step.lower(state, batch)
    return lowered.compile()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--topology", default="v5e:16x16")
    ap.add_argument("--per-device-batch", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    ap.add_argument("--hlo", help="write the optimised HLO text here")
    args = ap.parse_args(argv)

    from canon_jax.train.config import load_config

    cfg = load_config(args.config, args.set)
    t0 = time.perf_counter()
    compiled = compile_step(cfg, args.topology, args.per_device_batch)
    ma = compiled.memory_analysis()
    hlo = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    gib = 2.0**30
    out = {
        "config": args.config,
        "overrides": args.set,
        "topology": args.topology,
        "per_device_batch": args.per_device_batch,
        "seq_len": cfg.data.seq_len,
        "argument_gib": ma.argument_size_in_bytes / gib,
        "output_gib": ma.output_size_in_bytes / gib,
        "alias_gib": ma.alias_size_in_bytes / gib,
        "temp_gib": ma.temp_size_in_bytes / gib,
        "total_gib": (
            ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
        )
        / gib,
        "collectives": collective_counts(hlo),
        "compile_s": time.perf_counter() - t0,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
