"""The PyTorch side of ``experiments.bench_llama_step``: the same LlamaCanon training step in eager PyTorch on CPU.

An independent PyTorch implementation (not the official code, which needs ``transformers``) of the model the JAX
benchmark times, computed the way the official release does it on a CPU: ``F.scaled_dot_product_attention`` with
``is_causal=True``, SwiGLU, RMSNorm, rotate-half RoPE, and each Canon layer as the official CPU fallback computes it
(a depthwise ``F.conv1d`` with ``K - 1`` zero padding on both sides, cut to the first T outputs, plus the residual;
the CUDA-only ``causal_conv1d`` package is unavailable on CPU). Same shapes as the JAX benchmark: 4 layers, hidden
256, 4 heads, FFN 768, seq 512, batch 8, vocab 512, float32, AdamW (β 0.9/0.95, weight decay 0.1).

    pip install torch --index-url https://download.pytorch.org/whl/cpu      # or: pip install -e ".[torch]"
    python -m experiments.bench_llama_step_torch --steps 3 --repeats 3

It exists so that canon-jax's CPU step can be compared with PyTorch on the *same* machine (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from canon_jax import runtime


class Canon(nn.Module):
    """Depthwise causal conv + residual on ``[B, T, C]``, as the official CPU fallback computes it."""

    def __init__(self, width, kernel=4):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(width, 1, kernel).uniform_(-(kernel**-0.5), kernel**-0.5))

    def forward(self, x):
        t = x.shape[1]
        y = F.conv1d(x.transpose(1, 2), self.weight, padding=self.kernel - 1, groups=x.shape[-1])[..., :t]
        return x + y.transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(t, head_dim, theta=10000.0):
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def rotate_half(x, cos, sin):
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, d, heads, ffn, canon_set):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.w1, self.w3 = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.w2 = nn.Linear(ffn, d, bias=False)
        ident = nn.Identity()
        self.ca = Canon(d) if "A" in canon_set else ident
        self.cb = Canon(3 * d) if "B" in canon_set else ident
        self.cc = Canon(d) if "C" in canon_set else ident
        self.cd = Canon(2 * ffn) if "D" in canon_set else ident

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        h = self.ca(self.n1(x))
        qkv = self.cb(torch.cat([self.wq(h), self.wk(h), self.wv(h)], dim=-1))
        q, k, v = (z.view(b, t, self.heads, self.hd).transpose(1, 2) for z in qkv.split(d, dim=-1))
        q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, d))
        h = self.cc(self.n2(x))
        gu = self.cd(torch.cat([self.w1(h), self.w3(h)], dim=-1))
        g, u = gu.chunk(2, dim=-1)
        return x + self.w2(F.silu(g) * u)


class Llama(nn.Module):
    def __init__(self, vocab, d, layers, heads, ffn, canon_set, seq):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn, canon_set) for _ in range(layers))
        self.norm, self.head = RMSNorm(d), nn.Linear(d, vocab, bias=False)
        cos, sin = rope_tables(seq, d // heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, ids):
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        return self.head(self.norm(x))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--canon-sets", default=",ABCD")
    args = ap.parse_args(argv)
    runtime.print_hint("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"PyTorch {torch.__version__} on CPU, {torch.get_num_threads()} threads; {args.layers}L d{args.hidden} "
        f"{args.heads}h ffn {args.ffn} seq {args.seq} batch {args.batch} vocab {args.vocab} float32; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
    )
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    runs = []
    for cs in args.canon_sets.split(","):
        model = Llama(args.vocab, args.hidden, args.layers, args.heads, args.ffn, cs, args.seq)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            loss.backward()
            opt.step()
            return loss

        step()  # warm-up
        runs.append({"canon_set": cs or "none", "step": step, "times": []})
    for _ in range(args.repeats):  # interleaved windows, as in the JAX benchmark
        for r in runs:
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                loss = r["step"]()
            r["times"].append(((time.perf_counter() - t) / args.steps, (time.process_time() - c) / args.steps))
            r["loss"] = loss.item()
    tokens = args.batch * args.seq
    for r in runs:
        wall = statistics.median(w for w, _ in r["times"])
        cpu = statistics.median(c for _, c in r["times"])
        r["ms"] = 1000 * wall
        print(
            f"canon_set={r['canon_set']:>5}: {r['ms']:8.1f} ms/step  {tokens / wall:8.0f} tokens/s  CPU "
            f"{1000 * cpu:8.1f} ms/step (windows {[round(1000 * w, 1) for w, _ in r['times']]} ms, "
            f"loss {r['loss']:.3f})"
        )
    if len(runs) > 1:
        print(f"ratio {runs[-1]['canon_set']} / {runs[0]['canon_set']}: wall {runs[-1]['ms'] / runs[0]['ms']:.3f}x")


if __name__ == "__main__":
    main()
