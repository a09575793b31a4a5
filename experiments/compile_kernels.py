"""Compile every Pallas kernel for real TPU and GPU targets on this (CPU-only) machine and print the "Compiled for"
table of docs/kernels.md.

    python -m experiments.compile_kernels                      # all cases, targets v5e, v6e, v5p, sm_90a
    python -m experiments.compile_kernels --targets v5e,sm_90a --cases conv_bf16_paper

Deviceless ahead-of-time compilation (``canon_jax.aot``): libtpu's Mosaic compiler and, for sm_90a, XLA:GPU with
Mosaic GPU and ptxas run for real; nothing is executed. Each case is a ``jax.value_and_grad`` through a kernel's
custom VJP, so its program holds the forward and every backward kernel. Per kernel the table gives the on-chip
scratch memory (TPU: VMEM of the double-buffered pipeline blocks, padded to (sublane, 128-lane) tiles, plus the
scratch buffers — an estimate from the block specs; GPU: the shared memory Mosaic GPU allocates, read from its dump)
and, on GPU, the registers per thread and spill bytes from ``ptxas -v``.

Importing this module sets ``MOSAIC_GPU_DUMP_TO`` (a private temporary folder unless already set) and
``MOSAIC_GPU_DUMP_PTXAS=1``: the CUDA plugin writes every Mosaic GPU kernel's ptxas log there at compile time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable

if "MOSAIC_GPU_DUMP_TO" not in os.environ:
    os.environ["MOSAIC_GPU_DUMP_TO"] = tempfile.mkdtemp(prefix="canon_jax_mosaic_gpu_")
os.makedirs(os.environ["MOSAIC_GPU_DUMP_TO"], exist_ok=True)
os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # as canon_jax.aot, before jax loads its plugins

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from canon_jax import aot
from pallas_kernels import cost
from pallas_kernels.linear_scan import gla, ssd
from pallas_kernels.short_conv import short_conv

S = jax.ShapeDtypeStruct
BF16, F32 = jnp.bfloat16, jnp.float32

# Single-chip topologies: a kernel compiles per chip. Column title -> canon_jax.aot target name.
TARGETS = {"v5e": "v5e:1x1", "v6e": "v6e:1x1", "v5p": "v5p:1x1x1", "v4": "v4:1x1x1", "sm_90a": "h100:1x1x1"}
DEFAULT_TARGETS = ("v5e", "v6e", "v5p", "sm_90a")
CUSTOM_CALL = {"tpu": "tpu_custom_call", "gpu": "mosaic_gpu_v2"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One program: ``fn(backend)`` returns the function to compile, ``args`` its abstract arguments.
    ``kernels[backend]``: the kernel names (with multiplicity) the compiled program must contain.
    ``tpu_flops``: ``[(kernel name, flops)]`` of every TPU kernel by the formulas of ``pallas_kernels.cost`` (for
    shapes that need no padding), which the compiled custom calls' cost estimates must equal."""

    name: str
    what: str
    fn: Callable[[str], Callable]
    args: tuple
    kernels: dict
    tpu_flops: list | None = None


def _vg(f, argnums):
    return jax.value_and_grad(lambda *a: jnp.sum(f(*a).astype(F32)), argnums=argnums)


def _conv_case(name, what, shape, k, dtype, segments):
    b, t, d = shape
    args = [S(shape, dtype), S((k, d), F32), S((d,), F32)]
    if segments:
        args += [S((b, t), jnp.int32), S((b, d, k), dtype)]

    def fn(backend):
        def f(x, w, bias, *rest):
            seg, st = rest if rest else (None, None)
            return short_conv(
                x, w, bias=bias, activation="silu", residual=True, segment_ids=seg, initial_state=st, backend=backend
            )

        return _vg(f, (0, 1, 2, 4) if segments else (0, 1, 2))

    names = ["short_conv_causal", "short_conv_causal", "short_conv_anticausal"]  # forward, SiLU recompute, dx
    flops = None
    if t % 256 == 0 and d % 512 == 0:  # the TPU tiles divide: no padding
        per = lambda **kw: cost.conv_flops(k, **kw)[0] * b * t * d
        flops = [
            ("short_conv_causal", per(has_bias=True, activation="silu", residual=True, extra=False)),
            ("short_conv_causal", per(has_bias=True, activation=None, residual=False, extra=False)),  # recompute
            # dx (+ dy, the residual's gradient) with the fused weight/bias-gradient sums
            (
                "short_conv_anticausal",
                per(has_bias=False, activation=None, residual=False, extra=True) + (2 * k + 1) * b * t * d,
            ),
        ]
    return Case(name, what, fn, tuple(args), {"tpu": names, "gpu": names}, flops)


def _scan_flops(b, t, h, dk, dv, *, scalar, chunk=64, sub=16):
    """TPU scan kernels' flops (forward, states pass, reverse-time backward) when T is a multiple of the chunk."""
    if t % chunk:
        return None
    per = lambda f, **kw: f(chunk, dk, dv, scalar=scalar, sub=sub, **kw)[0] * b * h * (t // chunk)
    return [
        ("gated_linear_scan", per(cost.scan_chunk_flops)),
        ("gated_linear_scan", per(cost.scan_chunk_flops, states_only=True)),
        ("gated_linear_scan_bwd", per(cost.scan_chunk_bwd_flops)),
    ]


def _gla_case(name, what, b, t, h, dk, dv, dtype, state):
    args = [S((b, t, h, dk), dtype), S((b, t, h, dk), dtype), S((b, t, h, dv), dtype), S((b, t, h, dk), F32)]
    if state:
        args.append(S((b, h, dk, dv), F32))

    def fn(backend):
        def f(q, k, v, g, *st):
            o, s = gla(q, k, v, g, initial_state=st[0] if st else None, backend=backend)
            return jnp.sum(o.astype(F32)) + jnp.sum(s)

        return _vg(f, tuple(range(len(args))))

    return Case(
        name,
        what,
        fn,
        tuple(args),
        {
            "tpu": ["gated_linear_scan", "gated_linear_scan", "gated_linear_scan_bwd"],  # forward, states pass, bwd
            "gpu": [
                "gla_scan_fwd_wgmma",
                "scan_state_pass_fwd",
                "scan_state_pass_rev",
                "gla_scan_bwd_dqk",
                "gla_scan_bwd_dv",
            ],
        },
        _scan_flops(b, t, h, dk, dv, scalar=False),
    )


def _ssd_case(name, what, b, t, h, p, g, n, dtype, extras, chunk=64):
    args = [S((b, t, h, p), dtype), S((b, t, h), F32), S((h,), F32), S((b, t, g, n), dtype), S((b, t, g, n), dtype)]
    if extras:
        args += [S((h,), F32), S((b, h, p, n), F32)]

    def fn(backend):
        def f(x, dt, a, bm, cm, *rest):
            d, st = rest if rest else (None, None)
            y, s = ssd(x, dt, a, bm, cm, d, initial_state=st, chunk_size=chunk, backend=backend)
            return jnp.sum(y.astype(F32)) + jnp.sum(s)

        return _vg(f, tuple(range(len(args))))

    return Case(
        name,
        what,
        fn,
        tuple(args),
        {
            "tpu": ["gated_linear_scan", "gated_linear_scan", "gated_linear_scan_bwd"],
            "gpu": [
                "ssd_scan_fwd_wgmma",
                "scan_state_pass_fwd",
                "scan_state_pass_rev",
                "ssd_scan_bwd_dqk",
                "ssd_scan_bwd_dv",
            ],
        },
        _scan_flops(b, t, h, n, p, scalar=True, chunk=chunk),
    )


# The paper's shapes (configs/experiments/*_1b.yaml): width 2048, llama T = 4096; GLA5 / Mamba2 T = 16384, 16 heads,
# GLA Dk = 128 / Dv = 256 (expand_k 1, expand_v 2), Mamba2 P = 256, N = 128, one group. Odd shapes: T not a multiple
# of any tile or chunk, narrow channels, batch 2, grouped SSD heads.
CASES = {
    c.name: c
    for c in (
        _conv_case("conv_bf16_paper", "conv K=4 bf16 [1, 4096, 2048]", (1, 4096, 2048), 4, BF16, False),
        _conv_case(
            "conv_f32_paper_seg_state", "conv K=4 f32 [1, 4096, 2048] + segments + state", (1, 4096, 2048), 4, F32, True
        ),
        _conv_case("conv_f32_odd", "conv K=4 f32 [2, 37, 40]", (2, 37, 40), 4, F32, False),
        _conv_case(
            "conv_bf16_odd_seg_state", "conv K=3 bf16 [2, 37, 40] + segments + state", (2, 37, 40), 3, BF16, True
        ),
        _gla_case("gla_bf16_paper", "GLA bf16 B=1 T=16384 H=16 Dk=128 Dv=256", 1, 16384, 16, 128, 256, BF16, False),
        _gla_case("gla_f32_odd", "GLA f32 B=2 T=200 H=2 Dk=64 Dv=64 + state", 2, 200, 2, 64, 64, F32, True),
        # Mamba2's chunk of 256: the TPU kernels run at it, the Mosaic GPU ones at 64 (their shared-memory plan)
        _ssd_case(
            "ssd_bf16_paper",
            "SSD bf16 B=1 T=16384 H=16 P=256 N=128 G=1 chunk 256",
            1,
            16384,
            16,
            256,
            1,
            128,
            BF16,
            False,
            chunk=256,
        ),
        _ssd_case("ssd_f32_odd", "SSD f32 B=2 T=200 H=4 P=64 N=64 G=2 + D + state", 2, 200, 4, 64, 2, 64, F32, True),
    )
}


@dataclasses.dataclass
class Kernel:
    name: str
    flops: int | None = None  # TPU: the pl.CostEstimate in the custom call's backend config
    scratch_bytes: int | None = None  # TPU: VMEM estimate; GPU: shared memory allocated
    registers: int | None = None  # GPU: per thread (ptxas -v)
    spill_stores: int | None = None
    spill_loads: int | None = None


@dataclasses.dataclass
class Result:
    case: str
    target: str
    ok: bool
    error: str = ""
    kernels: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def _subjaxprs(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _subjaxprs(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _subjaxprs(sub)


def _tile_bytes(shape, dtype):
    """VMEM bytes of a block: the last two dims padded to the (sublane, 128-lane) tile."""
    shape = [int(s) for s in shape] or [1]
    itemsize = jnp.dtype(dtype).itemsize
    if len(shape) >= 1:
        shape[-1] = -(-shape[-1] // 128) * 128
    if len(shape) >= 2:
        rows = 8 * max(1, 4 // itemsize)
        shape[-2] = -(-shape[-2] // rows) * rows
    return math.prod(shape) * itemsize


def tpu_vmem_estimates(fn, args):
    """``{kernel name: VMEM bytes}`` (largest per name): 2 buffers per pipelined block + scratch, from the jaxpr."""
    out = {}
    for eqn in _subjaxprs(jax.make_jaxpr(fn)(*args).jaxpr):
        if eqn.primitive.name != "pallas_call":
            continue
        gm = eqn.params["grid_mapping"]
        total = sum(
            2 * _tile_bytes(bm.transformed_block_aval.shape, bm.transformed_block_aval.dtype)
            for bm in gm.block_mappings
        )
        total += sum(_tile_bytes(a.shape, a.dtype) for a in gm.scratch_avals)
        name = eqn.params.get("name") or eqn.params["debug_info"].func_name
        out[name] = max(out.get(name, 0), total)
    return out


_PTXAS = re.compile(
    r"Compiling entry function '(\w+)_mosaic_gpu_kernel'.*?(\d+) bytes spill stores, (\d+) bytes "
    r"spill loads.*?Used (\d+) registers",
    re.DOTALL,
)
_SMEM = re.compile(r"dynamic_shared_memory_size %c(\d+)_i32")


def _gpu_dumps(before):
    """ptxas results and shared memory of the kernels dumped since ``before`` (a set of file names)."""
    folder = os.environ["MOSAIC_GPU_DUMP_TO"]
    new = sorted(set(os.listdir(folder)) - before)
    stats = {}
    for f in new:
        if f.endswith(".ptxas"):
            with open(os.path.join(folder, f)) as fh:
                text = fh.read()
            for m in _PTXAS.finditer(text):
                base = f[: -len(".ptxas")]
                smem = None
                log = os.path.join(folder, base + ".mlir-passes.log")
                if os.path.exists(log):
                    with open(log) as fh:
                        found = _SMEM.findall(fh.read())
                    smem = int(found[-1]) if found else None
                stats.setdefault(m.group(1), []).append(
                    dict(
                        spill_stores=int(m.group(2)),
                        spill_loads=int(m.group(3)),
                        registers=int(m.group(4)),
                        scratch_bytes=smem,
                    )
                )
    return stats


_OP_NAME = re.compile(r'op_name="[^"]*?([A-Za-z0-9_]+)\)*/(?:pallas_call|mpmd_map)"')  # pallas_call / plgpu.kernel
_COST = re.compile(r'\\?"cost_estimate\\?":\{\\?"flops\\?":\\?"(\d+)')


def custom_calls(text, platform):
    """``[(kernel name, flops or None)]`` for every Pallas custom call of a compiled program's HLO text."""
    calls = []
    for line in text.splitlines():
        if f'custom_call_target="{CUSTOM_CALL[platform]}"' not in line:
            continue
        m = _OP_NAME.search(line)
        c = _COST.search(line)
        calls.append((m.group(1) if m else "?", int(c.group(1)) if c else None))
    return calls


@functools.cache
def compile_case(case_name: str, target_key: str) -> Result:
    """Lower and compile ``CASES[case_name]`` for ``TARGETS[target_key]`` (cached per process)."""
    case = CASES[case_name]
    target = aot.get_target(TARGETS[target_key])
    fn = case.fn(target.platform)
    mesh = aot.make_mesh(target, (1,), ("d",))
    shard = NamedSharding(mesh, PartitionSpec())
    folder = os.environ["MOSAIC_GPU_DUMP_TO"]
    before = set(os.listdir(folder))
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(fn, in_shardings=(shard,) * len(case.args)).lower(*case.args).compile()
    except Exception as e:  # reported in the table; the tests assert ok
        return Result(
            case_name,
            target_key,
            False,
            f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
            seconds=time.perf_counter() - t0,
        )
    seconds = time.perf_counter() - t0
    kernels = [Kernel(name, flops) for name, flops in custom_calls(compiled.as_text(), target.platform)]
    if target.platform == "tpu":
        vmem = tpu_vmem_estimates(fn, case.args)
        for k in kernels:
            k.scratch_bytes = vmem.get(k.name)
    else:
        stats = _gpu_dumps(before)
        for k in kernels:
            if stats.get(k.name):
                for key, val in stats[k.name].pop(0).items():
                    setattr(k, key, val)
    return Result(case_name, target_key, True, kernels=kernels, seconds=seconds)


def _kib(n):
    return "?" if n is None else f"{n / 1024:.0f} KiB"


def table(results) -> str:
    """Markdown: one row per (case, kernel), one column per target."""
    targets = list(dict.fromkeys(r.target for r in results))
    by = {(r.case, r.target): r for r in results}
    head = "| case | kernel | " + " | ".join(f"{'TPU ' if t != 'sm_90a' else ''}{t}" for t in targets) + " |"
    lines = [head, "|" + "---|" * (2 + len(targets))]
    for case in dict.fromkeys(r.case for r in results):
        names = []
        for t in targets:
            r = by.get((case, t))
            for k in r.kernels if r and r.ok else []:
                if k.name not in names:
                    names.append(k.name)
        for name in names or ["(none)"]:
            cells = []
            for t in targets:
                r = by.get((case, t))
                if r is None:
                    cells.append("")
                elif not r.ok:
                    cells.append(f"**no**: {r.error[:80]}")
                else:
                    ks = [k for k in r.kernels if k.name == name]
                    if not ks:
                        cells.append("—")
                        continue
                    k = max(ks, key=lambda k: k.scratch_bytes or 0)
                    cell = f"yes ×{len(ks)}, {_kib(k.scratch_bytes)}"
                    if k.registers is not None:
                        cell += f", {k.registers} regs, spill {k.spill_stores}/{k.spill_loads} B"
                    cells.append(cell)
            lines.append(f"| {CASES[case].what} | `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help=f"comma-separated, of {list(TARGETS)}")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    a = ap.parse_args(argv)
    targets = [t for t in a.targets.split(",") if t]
    cases = [c for c in a.cases.split(",") if c]
    for name, known in ((targets, TARGETS), (cases, CASES)):
        bad = [x for x in name if x not in known]
        if bad:
            ap.error(f"unknown {bad}; choose from {list(known)}")
    results = []
    for t in targets:
        for c in cases:
            r = compile_case(c, t)
            print(f"{t:7s} {c:26s} {'ok' if r.ok else 'FAILED'} {r.seconds:5.1f}s {r.error}", file=sys.stderr)
            results.append(r)
    print(f"jax {jax.__version__}; compiled with `python -m experiments.compile_kernels --targets {','.join(targets)}`")
    print()
    print(table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
