"""Will this config run on that machine? Compile its training step for a TPU slice or GPU host, without the machine.

    python -m experiments.compile --config configs/experiments/llama_canon_1b.yaml --target v5p:4x4x4 [--set k=v ...]
        [--json OUT.json] [--find-batch]
    python -m experiments.compile --table configs/experiments --targets v5p:4x4x4,h200:1x1x8 --out docs/scaling.md

Builds the exact step of ``experiments.train`` (same config loading, same ``Trainer``: sharded state, donated
buffers, gradient accumulation) on the abstract devices of ``--target`` and compiles it with the real compiler
(libtpu for TPUs, XLA GPU + ptxas for CUDA; the ``aot`` extra). Prints per-device memory from the compiled program,
the chip's HBM and whether it fits, the number of Pallas kernels in the program, model FLOPs per step (computed
analytically, see ``canon_jax/train/flops.py``), tokens per device and the compile time. A program over HBM is
reported as "does not fit", not as an error. ``--find-batch`` searches (by compiling) the largest per-device batch
that fits, and the smallest ``train.grad_accum`` that fits the configured global batch. ``--per-device-batch N``
sets ``train.batch_size`` to N sequences per data-parallel device; the result also counts the collectives of the
compiled program (``--hlo FILE`` writes its optimised HLO), e.g. to check that FSDP reduce-scatters the weight
gradients::

    LIBTPU_INIT_ARGS=--xla_tpu_max_hbm_size_mib=200000 python -m experiments.compile \
        --config configs/experiments/llama_canon_1b.yaml --target v5e:16x16 --per-device-batch 4 \
        --set model.kernel_impl=xla

``--table DIR`` compiles every ``*.yaml`` in DIR for every ``--targets`` entry (with ``--find-batch`` unless
``--no-find-batch``), caches each result as JSON in ``--cache`` (a rerun only compiles what is missing) and writes
the Markdown table to ``--out``. Exit status: 0 fits, 1 does not fit, 2 config error.
"""

from __future__ import annotations

import os

# Compiling for GPUs must not look for a CUDA driver; TPU compilation is deviceless too. Before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import dataclasses
import json
import pathlib
import re
import sys
import time

from canon_jax.train.config import ConfigError, load_config

GiB = 1 << 30


# Custom-call targets of Pallas kernels in compiled HLO: Mosaic TPU, Mosaic GPU, and Pallas' Triton lowering.
_PALLAS_CALL = re.compile(r'custom_call_target="(tpu_custom_call|mosaic_gpu[a-z0-9_]*|__gpu\$xla\.gpu\.triton)"')


def count_pallas_kernels(hlo_text: str) -> int:
    """Number of Pallas kernel calls (Mosaic TPU / Mosaic GPU / Triton custom calls) in an HLO module's text."""
    return len(_PALLAS_CALL.findall(hlo_text))


COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")


def _computations(hlo_text: str) -> dict:
    """``{computation name: its lines}`` of an HLO module's text."""
    out, name = {}, ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            name = line.split(" ", 1)[0]
            if name == "ENTRY":
                name = "ENTRY " + line.split(" ", 2)[1]
        out.setdefault(name, []).append(line)
    return out


_CALLS = re.compile(
    r"\b(?:calls|body|condition|to_apply|called_computations|branch_computations)=\{?([^,}\s]*(?:, %[^,}\s]*)*)"
)


def loop_computations(hlo_text: str) -> set:
    """Names of the computations that run inside a ``while`` loop body: the bodies and everything they call
    (fusions, reductions, nested loops). A scanned layer stack's forward and backward are such loops."""
    comps = _computations(hlo_text)
    calls = {
        name: {c.strip().lstrip("%") for m in _CALLS.finditer("\n".join(lines)) for c in m.group(1).split(",")} - {""}
        for name, lines in comps.items()
    }
    todo = [
        m.group(1)
        for lines in comps.values()
        for line in lines
        if " while(" in line
        for m in [re.search(r"\bbody=%([\w.\-]+)", line)]
        if m
    ]
    seen = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(calls.get("%" + name, ()))
    return {"%" + n for n in seen}


def collectives(hlo_text: str, computations=None) -> list:
    """``(kind, result_shape_text)`` of every collective instruction in an optimised HLO module's text (async
    ``-start``/``-done`` pairs counted once, at the start); with ``computations`` (a set of names, e.g.
    :func:`loop_computations`), only those in these computations.

    XLA:TPU writes a reduce-scatter as an ``all-reduce`` + ``dynamic-slice`` inside a fused computation named
    ``all-reduce-scatter.N``: those all-reduces count as ``reduce-scatter``.
    """
    out = []
    for computation, lines in _computations(hlo_text).items():
        if computations is not None and computation not in computations:
            continue
        for line in lines:
            m = re.search(r" = (.*?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", line)
            if m:
                kind = m.group(2)
                if kind == "all-reduce" and computation.startswith("%all-reduce-scatter"):
                    kind = "reduce-scatter"
                out.append((kind, m.group(1)))
    return out


def collective_counts(hlo_text: str, computations=None) -> dict:
    """Instructions of each collective kind; ``<kind> (weights)``: those whose result holds a 2-D bf16/f32 matrix
    with both dimensions >= 64, i.e. a projection weight (not a low-rank gate factor such as ``[16, value]``, which
    is replicated and rightly all-reduced, nor a ``[1, C]`` row). ``computations``: see :func:`collectives`."""
    counts = {k: 0 for k in COLLECTIVES}
    counts.update({f"{k} (weights)": 0 for k in COLLECTIVES})
    for kind, shape in collectives(hlo_text, computations):
        counts[kind] += 1
        if any(min(int(a), int(b)) >= 64 for a, b in re.findall(r"\b(?:bf16|f32)\[(\d+),(\d+)\]", shape)):
            counts[f"{kind} (weights)"] += 1
    return counts


# ----------------------------------------------------------------------------------------------------------------------
def _oom_message(e: Exception) -> str | None:
    """The compiler's out-of-memory explanation, or None when ``e`` is another failure."""
    msg = str(e)
    if (
        "RESOURCE_EXHAUSTED" not in msg
        and "exceeds available" not in msg.lower()
        and "out of memory" not in msg.lower()
    ):
        return None
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    keep = [ln for ln in lines if re.search(r"RESOURCE_EXHAUSTED|hbm|memory|Used|exceed", ln, re.I)]
    return " ".join((keep or lines)[:3])[:600]


def with_per_device_batch(cfg, num_devices: int, per_device_batch: int):
    """``cfg`` with ``train.batch_size`` = ``per_device_batch`` sequences per data-parallel device of its mesh."""
    from canon_jax.train.sharding import MESH_AXES, mesh_shape

    mesh = dict(zip(MESH_AXES, mesh_shape(cfg.mesh, num_devices)))
    return _with(cfg, batch_size=per_device_batch * mesh["data"] * mesh["fsdp"])


def compile_step(cfg, target, per_device_batch: int | None = None):
    """The compiled training step of ``cfg`` on ``target``'s devices (a :class:`canon_jax.aot.Target` or its name);
    ``per_device_batch``: see :func:`with_per_device_batch`."""
    from canon_jax.aot import get_target
    from canon_jax.train.trainer import Trainer

    target = get_target(target) if isinstance(target, str) else target
    if per_device_batch is not None:
        cfg = with_per_device_batch(cfg, target.num_devices, per_device_batch)
    return Trainer(cfg, devices=target.devices).lower_step().compile()


def compile_config(cfg, target, hlo_path=None) -> dict:
    """Compile ``cfg``'s training step for ``target`` (a :class:`canon_jax.aot.Target`); a JSON-able result dict.
    ``hlo_path``: also write the optimised HLO text there."""
    import jax

    from canon_jax.train.flops import flops_per_token
    from canon_jax.train.trainer import Trainer

    trainer = Trainer(cfg, devices=target.devices)  # ConfigError (e.g. batch vs mesh) propagates
    mesh = dict(trainer.mesh.shape)
    dp = mesh["data"] * mesh["fsdp"]
    b, accum, t = cfg.train.batch_size, cfg.train.grad_accum, cfg.data.seq_len
    tokens = b * t
    res = {
        "config": cfg.name,
        "target": target.name,
        "platform": target.platform,
        "num_devices": target.num_devices,
        "mesh": mesh,
        "batch_size": b,
        "grad_accum": accum,
        "seq_len": t,
        "sequences_per_device": b / dp,
        "micro_batch_per_device": b / dp / accum,
        "tokens_per_step": tokens,
        "tokens_per_device": tokens / target.num_devices,
        "n_params": trainer.n_params,
        "model_flops_per_step": flops_per_token(trainer.model_config, trainer.n_params, t) * tokens,
        "kernel_impl": trainer.model_config.kernel_impl,
        "remat": trainer.model_config.remat,
        "hbm_bytes": target.hbm_bytes,
        "jax_version": jax.__version__,
        "git_commit": _git_commit(),
    }
    t0 = time.perf_counter()
    lowered = trainer.lower_step()
    res["lower_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - an out-of-HBM program is an answer, anything else is re-raised
        oom = _oom_message(e)
        if oom is None:
            raise
        res.update(compile_seconds=time.perf_counter() - t0, fits=False, compiled=False, error=oom)
        return res
    res["compile_seconds"] = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    mem = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp", "generated_code")}
    # Peak per device: live arguments + fresh outputs (donated buffers are reused) + scratch + the program itself.
    mem["total"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
    hlo = compiled.as_text()
    if hlo_path:
        pathlib.Path(hlo_path).write_text(hlo)
    res.update(
        compiled=True,
        memory=mem,
        fits=mem["total"] <= target.hbm_bytes,
        pallas_kernels=count_pallas_kernels(hlo),
        collectives=collective_counts(hlo),
    )
    return res


def _git_commit() -> str | None:
    import subprocess

    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=pathlib.Path(__file__).parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def _with(cfg, **train_fields):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_fields))


def find_batch(cfg, target, base: dict | None = None, max_per_device: int = 1024, log=print) -> dict:
    """Largest per-device batch (grad_accum 1) that fits, and the smallest grad_accum for ``cfg``'s global batch.

    Binary search over compiles: memory grows with the batch, so "fits" is monotone in it.
    """
    mesh = (base or compile_config(cfg, target))["mesh"]
    dp = mesh["data"] * mesh["fsdp"]
    results = {}

    def fits(per_device: int) -> bool:
        if per_device not in results:
            r = compile_config(_with(cfg, batch_size=per_device * dp, grad_accum=1), target)
            results[per_device] = r
            log(f"  per-device batch {per_device}: {_mem_str(r)}")
        return results[per_device]["fits"]

    if base is not None and base["grad_accum"] == 1 and float(base["sequences_per_device"]).is_integer():
        results[int(base["sequences_per_device"])] = base
    known_fit = [k for k, r in results.items() if r["fits"]]
    known_bad = [k for k, r in results.items() if not r["fits"]]
    lo = max(known_fit, default=0)  # largest known to fit
    hi = min(known_bad, default=None)  # smallest known not to fit
    if lo == 0 and hi is None:
        lo, hi = (1, None) if fits(1) else (0, 1)
    while hi is None:
        nxt = max(1, lo) * 2
        if nxt > max_per_device:  # stop searching: report the cap
            hi = max_per_device + 1
            break
        if fits(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    out = {
        "max_per_device_batch": lo,
        "search_cap": max_per_device,
        "max_tokens_per_device": lo * cfg.data.seq_len * dp / target.num_devices,
        "compiles": len(results),
    }
    if lo:
        out["memory_at_max"] = results[lo]["memory"]
    # Smallest grad_accum that keeps the configured global batch: micro-batches of at most `lo` per device.
    b = cfg.train.batch_size
    if lo and b % dp == 0:
        per_dev = b // dp
        accum = next(a for a in range(1, per_dev + 1) if per_dev % a == 0 and per_dev // a <= lo)
        out["min_grad_accum"] = accum
        if accum != cfg.train.grad_accum:
            r = compile_config(_with(cfg, grad_accum=accum), target)
            log(f"  grad_accum {accum} at global batch {b}: {_mem_str(r)}")
            out["min_grad_accum_fits"] = r["fits"]
            out["memory_at_min_grad_accum"] = r.get("memory")
    return out


# ----------------------------------------------------------------------------------------------------------------------
def _gib(x) -> str:
    return f"{x / GiB:.2f} GiB"


def _mem_str(r: dict) -> str:
    if not r.get("compiled"):
        return f"does not fit ({r.get('error', '')[:200]})"
    return f"{_gib(r['memory']['total'])} of {_gib(r['hbm_bytes'])} -> {'fits' if r['fits'] else 'does not fit'}"


def report(r: dict) -> str:
    m = r["mesh"]
    lines = [
        f"config {r['config']} on {r['target']} ({r['num_devices']} {r['platform'].upper()} devices, "
        f"mesh data={m['data']}"
        f" fsdp={m['fsdp']} tensor={m['tensor']}), jax {r['jax_version']}",
        f"  batch {r['batch_size']} x seq {r['seq_len']}, grad_accum {r['grad_accum']}: "
        f"{r['micro_batch_per_device']:g} sequences per device per micro-batch, "
        f"{r['tokens_per_device']:.0f} tokens per device per step",
        f"  params {r['n_params'] / 1e9:.3f} B, model FLOPs per step {r['model_flops_per_step']:.3e} "
        f"(kernel_impl {r['kernel_impl']}, remat {r['remat']})",
        f"  compile time {r['compile_seconds']:.1f} s",
    ]
    if r.get("compiled"):
        mem = r["memory"]
        lines.append(
            "  per device: "
            + ", ".join(f"{k} {_gib(mem[k])}" for k in ("argument", "output", "alias", "temp", "generated_code"))
        )
        lines.append(
            f"  total {_gib(mem['total'])} of HBM {_gib(r['hbm_bytes'])}: "
            f"{'FITS' if r['fits'] else 'DOES NOT FIT'}; Pallas kernels in the program: {r['pallas_kernels']}"
        )
        if "collectives" in r:
            lines.append("  collectives: " + ", ".join(f"{k} {v}" for k, v in r["collectives"].items() if v))
    else:
        lines.append(f"  DOES NOT FIT (HBM {_gib(r['hbm_bytes'])}): {r['error']}")
    if "find_batch" in r:
        fb = r["find_batch"]
        lines.append(
            f"  largest per-device batch that fits: {fb['max_per_device_batch']} "
            f"({fb['compiles']} compiles)"
            + (
                f"; smallest grad_accum for batch {r['batch_size']}: {fb['min_grad_accum']}"
                if "min_grad_accum" in fb
                else ""
            )
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
def _cache_name(config_path: pathlib.Path, target: str, overrides) -> str:
    tag = config_path.stem + "__" + target.replace(":", "_")
    if overrides:
        tag += "__" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", "+".join(overrides))
    return tag + ".json"


def run_one(config_path, target_name, overrides=(), do_find_batch=False, log=print) -> dict:
    from canon_jax.aot import get_target

    cfg = load_config(config_path, list(overrides))
    target = get_target(target_name)
    try:
        r = compile_config(cfg, target)
    except ConfigError as e:
        return {"config": cfg.name, "target": target_name, "config_error": str(e), "overrides": list(overrides)}
    r["overrides"] = list(overrides)
    if do_find_batch:
        r["find_batch"] = find_batch(cfg, target, base=r, log=log)
    return r


def _mesh_error(config_path, target_name, overrides) -> str | None:
    """The config error a batch that does not split over ``target``'s mesh raises, found without building a model."""
    from canon_jax.aot import get_target
    from canon_jax.train.config import check_batch_divides_mesh
    from canon_jax.train.sharding import MESH_AXES, mesh_shape

    cfg = load_config(config_path, list(overrides))
    try:
        shape = mesh_shape(cfg.mesh, get_target(target_name).num_devices)
        check_batch_divides_mesh(cfg, dict(zip(MESH_AXES, shape)))
    except (ConfigError, ValueError) as e:
        return str(e)
    return None


def table(
    config_dir,
    targets,
    cache_dir,
    out,
    overrides=(),
    do_find_batch=True,
    only_cached=False,
    first=(),
    check_only=False,
    log=print,
):
    """Compile (or read from the cache) every config x target; write the Markdown table to ``out``.

    Target-major: the first targets are finished first; within a target the configs named in ``first`` go first."""
    config_dir, cache_dir = pathlib.Path(config_dir), pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    configs = sorted(config_dir.glob("*.yaml"))
    order = sorted(configs, key=lambda p: (list(first).index(p.stem) if p.stem in first else len(first), p.stem))
    results = {}
    for target in targets:
        for path in order:
            f = cache_dir / _cache_name(path, target, overrides)
            cached = json.loads(f.read_text()) if f.exists() else None
            if cached is not None:
                results[(path.stem, target)] = cached
                if not do_find_batch or "find_batch" in cached or "compiled" not in cached:
                    continue
            if only_cached:
                continue
            err = _mesh_error(path, target, overrides)
            if err is not None:  # known without compiling: the batch does not split over this mesh
                r = {"config": path.stem, "target": target, "config_error": err, "overrides": list(overrides)}
                f.write_text(json.dumps(r, indent=1, sort_keys=True))
                results[(path.stem, target)] = r
                continue
            if check_only:
                continue
            log(f"compiling {path.stem} for {target} ...")
            t0 = time.perf_counter()
            try:
                if cached is not None:  # the defaults are compiled: only the batch search is missing
                    from canon_jax.aot import get_target

                    r = dict(cached)
                    r["find_batch"] = find_batch(
                        load_config(path, list(overrides)), get_target(target), base=r, log=log
                    )
                else:
                    r = run_one(path, target, overrides, do_find_batch, log=log)
            except Exception as e:  # noqa: BLE001 - a compiler failure is a table entry, the rest still runs
                r = {"config": path.stem, "target": target, "failure": f"{type(e).__name__}: {str(e)[:500]}"}
            r["wall_seconds"] = time.perf_counter() - t0 + (cached or {}).get("wall_seconds", 0.0)
            f.write_text(json.dumps(r, indent=1, sort_keys=True))
            results[(path.stem, target)] = r
            write_markdown(out, configs, targets, results, overrides)
    for target in targets:  # entries other processes cached meanwhile
        for path in configs:
            f = cache_dir / _cache_name(path, target, overrides)
            if (path.stem, target) not in results and f.exists():
                results[(path.stem, target)] = json.loads(f.read_text())
    write_markdown(out, configs, targets, results, overrides)
    return results


def _cell(r: dict | None) -> str:
    if r is None:
        return "not computed yet"
    if "config_error" in r:
        msg = r["config_error"]
        fix = msg.split("; set ", 1)[1] if "; set " in msg else msg
        return ("batch does not divide the mesh: set " + fix).replace("|", "/")
    if "failure" in r:
        return "compile failed: " + r["failure"].splitlines()[0][:120].replace("|", "/")
    s = (
        f"**fits** {_gib(r['memory']['total'])}"
        if r.get("fits")
        else (f"no: {_gib(r['memory']['total'])}" if r.get("compiled") else "no: over HBM")
    )
    s += f", {r['micro_batch_per_device']:g} seq/dev, {r['tokens_per_device']:.0f} tokens/dev"
    if r.get("compiled"):
        s += f", {r['pallas_kernels']} Pallas"
    fb = r.get("find_batch")
    if fb:
        s += f"; max {fb['max_per_device_batch']} seq/dev"
        if "min_grad_accum" in fb and fb["min_grad_accum"] != r["grad_accum"]:
            ok = fb.get("min_grad_accum_fits")
            s += f"; grad_accum {fb['min_grad_accum']}" + ("" if ok is None else (" fits" if ok else " (not verified)"))
        if fb["max_per_device_batch"] == 0:
            s += "; nothing fits on this mesh"
    return s


def write_markdown(out, configs, targets, results, overrides=()):
    import jax

    head = ["| preset | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    rows = []
    for path in configs:
        rows.append(f"| {path.stem} | " + " | ".join(_cell(results.get((path.stem, t))) for t in targets) + " |")
    text = "\n".join(head + rows) + "\n"
    missing = {t: [p.stem for p in configs if (p.stem, t) not in results] for t in targets}
    if any(missing.values()):
        text += "\nNot computed yet:\n" + "".join(
            f"- {t}: " + ("all presets" if len(m) == len(configs) else ", ".join(m)) + "\n"
            for t, m in missing.items()
            if m
        )
    text += f"\n<!-- generated by experiments/compile.py with jax {jax.__version__}; overrides: {list(overrides)} -->\n"
    out = pathlib.Path(out)
    start, end = "<!-- scaling-table:start -->", "<!-- scaling-table:end -->"
    if out.exists() and start in out.read_text():  # replace only the generated block of a hand-written doc
        doc = out.read_text()
        pre, rest = doc.split(start, 1)
        post = rest.split(end, 1)[1] if end in rest else ""
        out.write_text(pre + start + "\n" + text + end + post)
    else:
        out.write_text(start + "\n" + text + end + "\n")


# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config, as for experiments.train")
    p.add_argument("--target", help="machine to compile for, e.g. v5e:16x16, v5p:4x4x4, v4:4x4x4, v6e:8x8, h100:1x1x8")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, as for experiments.train (repeatable)",
    )
    p.add_argument("--json", help="write the result as JSON to this file")
    p.add_argument(
        "--per-device-batch",
        type=int,
        metavar="N",
        help="set train.batch_size to N sequences per data-parallel device of the target's mesh",
    )
    p.add_argument("--hlo", metavar="FILE", help="write the compiled program's optimised HLO text here")
    p.add_argument(
        "--find-batch",
        action="store_true",
        help="also search the largest per-device batch and the smallest grad_accum that fit",
    )
    p.add_argument("--table", metavar="DIR", help="compile every *.yaml in DIR for every --targets entry")
    p.add_argument(
        "--targets",
        default="v5p:4x4x4,h200:1x1x8,v5e:16x16,v4:4x4x4,v6e:8x8,h100:1x1x8",
        help="comma-separated targets for --table",
    )
    p.add_argument("--out", default="docs/scaling.md", help="Markdown file for --table (its generated block)")
    p.add_argument("--cache", default="docs/scaling_results", help="JSON result cache for --table")
    p.add_argument("--no-find-batch", action="store_true", help="--table without the batch search")
    p.add_argument("--only-cached", action="store_true", help="--table from the cache only (compile nothing)")
    p.add_argument(
        "--check-only",
        action="store_true",
        help="--table: record only the configs whose batch does not split over the mesh (no compiles)",
    )
    p.add_argument("--first", default="", help="comma-separated config names that --table compiles first")
    args = p.parse_args(argv)
    if not args.table and not (args.config and args.target):
        p.error("give --config and --target, or --table DIR")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        first = [f.strip() for f in args.first.split(",") if f.strip()]
        table(
            args.table,
            targets,
            args.cache,
            args.out,
            args.overrides,
            not args.no_find_batch,
            args.only_cached,
            first,
            args.check_only,
        )
        print(f"wrote {args.out}")
        return 0
    from canon_jax.aot import get_target

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        target = get_target(args.target)
    except (ValueError, ImportError) as e:  # unknown target name, or the aot extra is missing
        print(f"error: --target: {e}", file=sys.stderr)
        return 2
    try:
        if args.per_device_batch is not None:
            cfg = with_per_device_batch(cfg, target.num_devices, args.per_device_batch)
        r = compile_config(cfg, target, hlo_path=args.hlo)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    r["overrides"] = list(args.overrides)
    if args.find_batch:
        r["find_batch"] = find_batch(cfg, target, base=r)
    print(report(r))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(r, indent=1, sort_keys=True))
    return 0 if r["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
