"""Command line: inspect and export task samples.

    python -m canon_jax.data dump TASK --split {train,test} --num N --seed S [--set KEY=VALUE ...]
                                  [--id-convention {canon,official}] --out FILE.jsonl
    python -m canon_jax.data show TASK [--split ...] [--num N] [--seed S] [--set KEY=VALUE ...]
    python -m canon_jax.data vocab TASK [TASK ...]
    python -m canon_jax.data tokenize INPUT [INPUT ...] --out DIR [--tokenizer tokenizer.json] [--workers N]
                                  [--text-field text] [--txt-mode {file,paragraph,line}] [--no-bos] [--no-eos]
                                  [--encoder {auto,hf,tiktoken}]

A bad argument (unknown task or parameter, a bad value, ``--out`` in a folder that does not exist) prints one line
``config error: <what>: <why>`` and exits with status 2 before anything is written.

``dump`` writes one JSON object per line: ``{"tokens", "loss_mask", "meta"}`` where ``loss_mask`` is the per-token
answer label of the sample (1 = supervised answer token; the packer turns it into target-semantics masks).

``tokenize`` turns .txt/.jsonl(.gz)/.parquet files (globs or directories) into a directory of uint16/uint32 token
shards plus ``index.json`` (:mod:`canon_jax.data.shards`), one input file per worker process; rerunning it resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from canon_jax.data import base
from canon_jax.data.vocab import Vocabulary


class UsageError(ValueError):
    """A bad command-line value; ``main`` prints ``config error: <message>`` and returns 2."""


def _parse_sets(items: list[str] | None) -> dict:
    params = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set: expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        params[k.strip()] = v.strip()
    return params


def _make_task(name: str, sets: list[str] | None) -> base.Task:
    if name not in base.TASK_NAMES:
        raise UsageError(f"task: unknown task {name!r}; valid tasks: {', '.join(base.TASK_NAMES)}")
    try:
        return base.get_task(name, **_parse_sets(sets))
    except (ValueError, TypeError) as e:
        raise UsageError(f"--set: {' '.join(str(e).split())}") from None


def _check_out(path: str) -> None:
    if path == "-":
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--out: {path} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"--out: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--out: no permission to write in {folder}")


def _common(p: argparse.ArgumentParser, num_default: int):
    p.add_argument("task", help=f"one of {', '.join(base.TASK_NAMES)}")
    p.add_argument("--split", choices=base.SPLITS, default="train")
    p.add_argument("--num", type=int, default=num_default, help="number of samples")
    p.add_argument("--start", type=int, default=0, help="index of the first sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="task parameter override (repeatable)")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except UsageError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    prog = "canon-data" if os.path.basename(sys.argv[0]) == "canon-data" else "python -m canon_jax.data"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="write samples as JSON lines")
    _common(d, 100)
    d.add_argument("--id-convention", choices=("canon", "official"), default="canon")
    d.add_argument("--out", required=True, help="output .jsonl file ('-' = stdout)")
    s = sub.add_parser("show", help="print samples in human-readable form")
    _common(s, 1)
    v = sub.add_parser("vocab", help="print the shared vocabulary layout of a task mix")
    v.add_argument("tasks", nargs="+")
    t = sub.add_parser("tokenize", help="pre-tokenise text shards into a token directory (resumable)")
    t.add_argument("inputs", nargs="+", help="input files, globs or directories (.txt, .jsonl(.gz), .parquet)")
    t.add_argument("--out", required=True, help="output token directory")
    t.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer.json (default: built-in byte-level)")
    t.add_argument("--workers", type=int, default=1, help="processes tokenising input files in parallel")
    t.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the document")
    t.add_argument(
        "--txt-mode",
        choices=("file", "paragraph", "line"),
        default="file",
        help="a .txt file is one document, one per blank-line paragraph, or one per line",
    )
    t.add_argument("--no-bos", action="store_true", help="do not start documents with BOS")
    t.add_argument("--no-eos", action="store_true", help="do not end documents with EOS")
    t.add_argument("--bos-token", default=None, help="BOS token string (default: detected)")
    t.add_argument("--eos-token", default=None, help="EOS token string (default: detected)")
    t.add_argument("--batch-docs", type=int, default=1024, help="documents encoded per tokenizer batch")
    t.add_argument(
        "--encoder",
        choices=("auto", "hf", "tiktoken"),
        default="auto",
        help="tokenizers, or tiktoken for byte-level BPE tokenizers it reproduces exactly (auto: when it does)",
    )
    t.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    if args.cmd == "tokenize":
        from canon_jax.data.shards import tokenize_corpus

        try:
            tokenize_corpus(
                args.inputs,
                args.out,
                args.tokenizer,
                text_field=args.text_field,
                txt_mode=args.txt_mode,
                add_bos=not args.no_bos,
                add_eos=not args.no_eos,
                bos_token=args.bos_token,
                eos_token=args.eos_token,
                workers=args.workers,
                batch_docs=args.batch_docs,
                encoder=args.encoder,
                progress=not args.no_progress,
            )
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise SystemExit(f"tokenize: {e}") from None
        return 0

    if args.cmd == "vocab":
        bad = [t for t in args.tasks if t not in base.TASK_NAMES]
        if bad:
            raise UsageError(f"tasks: unknown task(s) {bad}; valid tasks: {', '.join(base.TASK_NAMES)}")
        print(Vocabulary(args.tasks).describe())
        return 0
    if args.num < 0 or args.start < 0:
        raise UsageError(f"--num/--start: must be >= 0, got {args.num}/{args.start}")
    task = _make_task(args.task, args.set)
    if args.cmd == "dump":
        _check_out(args.out)
    if args.cmd == "show":
        for i in range(args.start, args.start + args.num):
            smp = task.sample(i, args.split, args.seed)
            print(f"=== {task.name} {args.split} sample {i} ({len(smp)} tokens, {int(smp.labels.sum())} answer tokens)")
            print(task.show(smp))
        return 0
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")
    try:
        for i in range(args.start, args.start + args.num):
            smp = task.sample(i, args.split, args.seed)
            toks = task.to_official(smp.tokens) if args.id_convention == "official" else smp.tokens.tolist()
            out.write(json.dumps({"tokens": toks, "loss_mask": smp.labels.tolist(), "meta": smp.meta}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
