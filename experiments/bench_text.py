"""Real-text input benchmarks: tokenisation throughput and streamed-loader throughput / memory.

    python -m experiments.bench_text tokenize [--mb 32] [--files 8] [--vocab 8192] [--workers 1,2]
    python -m experiments.bench_text unicode    # tiktoken's split = tokenizers' on every Unicode code point
    python -m experiments.bench_text stream [--gb 5] [--seconds 90] [--seq-len 4096] [--batch 64] [--threads 4]
    python -m experiments.bench_text step       # what a LlamaCanon-1B step consumes per host on a TPU v5e-8

``tokenize``: generates Zipf-distributed pseudo-English text (no download), trains a byte-level BPE on part of it
with ``tokenizers``, then times ``tokenize_corpus`` with each encoder (``tokenizers``, ``tiktoken``) and each
``--workers`` count (wall time, tokens/s, CPU seconds of the process and its workers), then each encoder alone in one
thread on one file's documents. ``unicode``: encodes every code point's character-class probe
(:func:`canon_jax.data.tiktoken_bpe.split_probe`) with both encoders and counts the differences.
``stream``: writes a synthetic uint16 token directory of ``--gb`` GB (random ids, random document lengths), then
iterates the training loader (``make_token_dataset``, shuffled windows) for ``--seconds`` seconds, sampling the
process's resident memory. ``step``: tokens/s a 1B step consumes = chips * peak * MFU / FLOPs-per-token.
Every sub-command prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np


def _rss_mb() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker processes)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _words(rng, n_vocab=20000):
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = 1.0 / np.arange(1, 27)
    p /= p.sum()
    lens = rng.integers(1, 10, n_vocab)
    return ["".join(rng.choice(letters, size=k, p=p)) for k in lens]


def make_text(root: pathlib.Path, files: int, mb_total: float, seed: int = 0) -> list[str]:
    """``files`` JSONL files of Zipf-distributed words, ``mb_total`` MB of text overall."""
    rng = np.random.default_rng(seed)
    words = np.array(_words(rng))
    per_file = int(mb_total * 1e6 / files)
    paths = []
    for k in range(files):
        path = root / f"text-{k:03d}.jsonl"
        size = 0
        with open(path, "w") as f:
            while size < per_file:
                n = int(rng.integers(50, 800))
                idx = np.minimum(rng.zipf(1.2, n) - 1, len(words) - 1)
                doc = " ".join(words[idx])
                line = json.dumps({"text": doc}) + "\n"
                f.write(line)
                size += len(line)
        paths.append(str(path))
    return paths


def bench_tokenize(args) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import canon_jax.data.tiktoken_bpe  # noqa: F401  (imported before timing: a one-off cost, not a rate)
    import canon_jax.train.text_data  # noqa: F401
    from canon_jax.data.shards import tokenize_corpus

    # one thread from the start: a thread pool left from training would be counted in this process's CPU time
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_tok_", dir=args.tmp))
    try:
        files = make_text(root, args.files, args.mb)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=args.vocab,
            special_tokens=["<pad>", "<bos>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train([files[0]], trainer)
        tok_path = root / "tokenizer.json"
        tok.save(str(tok_path))
        res = {
            "bench": "tokenize",
            "text_mb": args.mb,
            "files": args.files,
            "vocab": tok.get_vocab_size(),
            "loadavg_before": os.getloadavg(),
        }
        workers_list = [int(w) for w in args.workers.split(",")]
        # the trained byte-level BPE with each encoder, and the built-in 259-id byte-level tokenizer (one token per
        # byte; not a regex-split BPE, so only tokenizers encodes it)
        runs = [("bpe", str(tok_path), enc) for enc in ("hf", "tiktoken")] + [("bytes", None, "hf")]
        for name, path, enc in runs:
            for workers in workers_list:
                cpu0 = _cpu_seconds()
                idx = tokenize_corpus(
                    files,
                    root / f"out_{name}_{enc}{workers}",
                    path,
                    workers=workers,
                    encoder=enc,
                    progress=False,
                    log=lambda *_: None,
                )
                cpu = _cpu_seconds() - cpu0
                tps = idx["new_tokens"] / idx["seconds"]
                res[f"{name}_{enc}_workers{workers}"] = {
                    "encoder_used": idx["encoder"],
                    "tokens": idx["new_tokens"],
                    "seconds": round(idx["seconds"], 2),
                    "tokens_per_s": round(tps),
                    "tokens_per_s_per_worker": round(tps / workers),
                    "cpu_seconds": round(cpu, 2),
                    "tokens_per_cpu_second": round(idx["new_tokens"] / cpu),
                }
                shutil.rmtree(root / f"out_{name}_{enc}{workers}")
        # each encoder alone (one thread) on one file's documents: the share of the pipeline that is encoding
        import itertools

        from canon_jax.data.shards import iter_document_batches
        from canon_jax.data.tiktoken_bpe import TiktokenBPE, tiktoken_spec

        docs = list(itertools.chain.from_iterable(iter_document_batches(files[1])))
        c0 = time.process_time()
        ref = [e.ids for e in tok.encode_batch_fast(docs, add_special_tokens=False)]
        res["encode_only_hf_tokens_per_cpu_second"] = round(sum(map(len, ref)) / (time.process_time() - c0))
        fast = TiktokenBPE(tiktoken_spec(tok), tok)
        c0 = time.process_time()
        got = fast.encode_batch(docs)
        res["encode_only_tiktoken_tokens_per_cpu_second"] = round(sum(map(len, got)) / (time.process_time() - c0))
        res["encode_only_ids_identical"] = all(list(g) == r for g, r in zip(got, ref))
        res["bytes_per_token"] = round(args.mb * 1e6 / res[f"bpe_hf_workers{workers_list[0]}"]["tokens"], 2)
        res["loadavg_after"] = os.getloadavg()
        import tiktoken
        import tokenizers

        res.update(tokenizers_version=tokenizers.__version__, tiktoken_version=tiktoken.__version__)
        return res
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench_unicode(args) -> dict:
    """Every code point (surrogates excepted) through the split probe with both encoders; the differences."""
    from canon_jax.data.tiktoken_bpe import TiktokenBPE, split_probe, tiktoken_spec

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok, probe = split_probe()
    fast = TiktokenBPE(tiktoken_spec(tok), tok)
    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    bad = []
    for i in range(0, len(cps), 65536):
        part = cps[i : i + 65536]
        docs = [probe(chr(c)) for c in part]
        ref = tok.encode_batch_fast(docs, add_special_tokens=False)
        got = fast.encode_batch(docs)
        bad += [hex(c) for c, r, g in zip(part, ref, got) if list(g) != r.ids]
    import tiktoken
    import tokenizers

    return {
        "bench": "unicode",
        "code_points": len(cps),
        "differences": len(bad),
        "first_differences": bad[:20],
        "tokenizers_version": tokenizers.__version__,
        "tiktoken_version": tiktoken.__version__,
    }


def write_synthetic_tokens(out: pathlib.Path, gb: float, shards: int = 10, vocab: int = 32000, seed: int = 0):
    """A token directory of random uint16 ids (``gb`` GB) with random document lengths (mean ~1500 tokens)."""
    from canon_jax.data.shards import FORMAT, VERSION

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = int(gb * 1e9 / 2 / shards)
    meta = []
    for k in range(shards):
        with open(out / f"tokens-{k:05d}.bin", "wb") as f:
            left = per
            while left:
                n = min(left, 1 << 26)
                f.write(rng.integers(3, vocab, n, dtype=np.uint16).tobytes())
                left -= n
        lens = rng.geometric(1 / 1500, per // 1000 + 10)
        starts = np.concatenate([[0], np.cumsum(lens)])
        starts = np.concatenate([starts[starts < per], [per]]).astype(np.int64)
        np.save(out / f"docs-{k:05d}.npy", starts)
        meta.append(
            {
                "tokens": f"tokens-{k:05d}.bin",
                "docs": f"docs-{k:05d}.npy",
                "source": "synthetic",
                "source_bytes": 0,
                "num_tokens": per,
                "num_docs": len(starts) - 1,
            }
        )
    index = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": "uint16",
        "vocab_size": vocab,
        "tokenizer_sha256": "synthetic",
        "bos_id": 1,
        "eos_id": 2,
        "text_field": "text",
        "txt_mode": "file",
        "num_tokens": per * shards,
        "num_docs": sum(m["num_docs"] for m in meta),
        "shards": meta,
    }
    (out / "index.json").write_text(json.dumps(index))


def bench_stream(args) -> dict:
    from canon_jax.train.config import DataSection, TextDataSection
    from canon_jax.train.text_stream import make_token_dataset

    root = pathlib.Path(args.token_dir or tempfile.mkdtemp(prefix="bench_stream_", dir=args.tmp))
    made = not (root / "index.json").exists()
    try:
        if made:
            t0 = time.perf_counter()
            write_synthetic_tokens(root, args.gb)
            print(f"wrote {args.gb} GB of tokens in {time.perf_counter() - t0:.0f} s", flush=True)
        cfg = DataSection(
            kind="text",
            seq_len=args.seq_len,
            seed=0,
            num_workers=args.threads,
            text=TextDataSection(train_tokens=str(root)),
        )
        rss0 = _rss_mb()
        it = iter(make_token_dataset(cfg, split="train", batch_size=args.batch))
        next(it)
        samples, t0, n = [], time.perf_counter(), 0
        while time.perf_counter() - t0 < args.seconds:
            next(it)
            n += 1
            if n % 10 == 0:
                samples.append(_rss_mb()["VmRSS"])
        dt = time.perf_counter() - t0
        tokens = n * args.batch * args.seq_len
        corpus = sum(f.stat().st_size for f in root.glob("tokens-*.bin"))
        return {
            "bench": "stream",
            "corpus_gb": round(corpus / 1e9, 2),
            "seq_len": args.seq_len,
            "batch": args.batch,
            "threads": args.threads,
            "seconds": round(dt, 1),
            "batches": n,
            "tokens_per_s": round(tokens / dt),
            "fraction_of_corpus_read": round(tokens * 2 / corpus, 3),
            "rss_mb_before": round(rss0["VmRSS"]),
            "rss_mb_first": round(samples[0]) if samples else None,
            "rss_mb_last": round(samples[-1]) if samples else None,
            "rss_mb_max": round(max(samples)),
            "rss_final": {k: round(v) for k, v in _rss_mb().items()},
        }
    finally:
        if made and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def bench_step(args) -> dict:
    import jax
    import jax.numpy as jnp

    from canon_jax.models import CausalLM
    from canon_jax.train.config import CONFIGS_ROOT, load_config, model_config
    from canon_jax.train.flops import PEAK_FLOPS_BF16, count_params, flops_per_token

    cfg = load_config(pathlib.Path(CONFIGS_ROOT) / "experiments" / f"{args.preset}.yaml")
    mc = model_config(cfg)
    shapes = jax.eval_shape(lambda: CausalLM(mc).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    n = count_params(shapes["params"])
    fpt = flops_per_token(mc, n, cfg.data.seq_len)
    peak = PEAK_FLOPS_BF16["TPU v5e"]
    tps = args.chips * peak * args.mfu / fpt
    return {
        "bench": "step",
        "preset": args.preset,
        "params": n,
        "seq_len": cfg.data.seq_len,
        "flops_per_token": fpt,
        "chips_per_host": args.chips,
        "peak_per_chip": peak,
        "mfu": args.mfu,
        "tokens_per_s_per_host": round(tps),
        "global_batch_tokens": cfg.train.batch_size * cfg.data.seq_len,
        "step_seconds": round(cfg.train.batch_size * cfg.data.seq_len / tps, 2),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize")
    t.add_argument("--mb", type=float, default=32)
    t.add_argument("--files", type=int, default=8)
    t.add_argument("--vocab", type=int, default=8192)
    t.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
    sub.add_parser("unicode")
    s = sub.add_parser("stream")
    s.add_argument("--gb", type=float, default=5)
    s.add_argument("--seconds", type=float, default=90)
    s.add_argument("--seq-len", type=int, default=4096)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--threads", type=int, default=4)
    s.add_argument("--token-dir", default=None, help="reuse an existing token directory")
    s.add_argument("--keep", action="store_true", help="keep the generated token directory")
    st = sub.add_parser("step")
    st.add_argument("--preset", default="llama_canon_1b")
    st.add_argument("--chips", type=int, default=8)
    st.add_argument("--mfu", type=float, default=0.5)
    for p in (t, s):
        p.add_argument("--tmp", default=os.environ.get("TMPDIR", "/tmp"))
    args = ap.parse_args(argv)
    benches = {"tokenize": bench_tokenize, "unicode": bench_unicode, "stream": bench_stream, "step": bench_step}
    res = benches[args.cmd](args)
    import jax

    res.update(
        jax_version=jax.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpus=os.cpu_count()
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
