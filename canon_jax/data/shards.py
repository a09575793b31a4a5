"""Pre-tokenised corpora: text shards -> fixed-dtype token shards + an index, and random access to them.

Layout of a token directory (written by :func:`tokenize_corpus`, ``python -m canon_jax.data tokenize``)::

    index.json            format, dtype, vocabulary size, tokenizer sha256, BOS/EOS ids, totals, the shard list,
                          the encoder library that wrote each shard (tokenizers or tiktoken: the same ids)
    tokens-00000.bin      raw little-endian uint16 (vocabulary <= 65536) or uint32 token ids of input file 0
    docs-00000.npy        int64 [num_docs + 1]: offset of each document's first token in the shard, then num_tokens
    tokens-00000.done     completion marker (JSON: source path, size, mtime, settings hash, counts)

One output shard per input file, in the sorted order of the inputs; the corpus is the concatenation of the shards.
Every document is ``[BOS] + ids + [EOS]`` (each optional). Shards are written to temporary names and renamed
atomically, the marker last; a rerun skips every input whose marker matches (same file size, mtime and settings),
so an interrupted run resumes where it stopped. ``index.json`` is written once all shards are done.

Random access (:class:`TokenShards`) is by offset: the raw ``.bin`` layout is what ``np.memmap`` reads (and what
tools such as nanoGPT/Megatron-style readers expect), and the reader uses positional reads (``os.pread``) of exactly
the requested tokens, so the process keeps no page of the corpus mapped and its resident memory does not grow with
the corpus size or with the number of windows read. The per-shard document offsets are memory-mapped ``.npy``
files (8 bytes per document, clean file pages the kernel can drop).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import pathlib
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["tokenize_corpus", "TokenShards", "token_dtype", "FORMAT", "SUFFIXES", "tokenizer_sha256"]

FORMAT = "canon-jax-token-shards"
VERSION = 1
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabulary <= 65536), else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocabulary size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenizer_sha256(tok) -> str:
    """sha256 of the tokenizer's canonical JSON serialisation (same tokenizer -> same hash, whatever the file)."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def _suffix(path: pathlib.Path) -> str:
    name = path.name.lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    raise ValueError(f"{path}: unsupported input type; use one of {list(SUFFIXES)}")


def _open_text(path: pathlib.Path):
    return (
        gzip.open(path, "rt", encoding="utf-8") if path.name.lower().endswith(".gz") else open(path, encoding="utf-8")
    )


def iter_document_batches(
    path, text_field: str = "text", txt_mode: str = "file", batch_docs: int = 1024
) -> Iterator[list[str]]:
    """Documents of one input file, in order, in lists of at most ``batch_docs`` (bounded memory for big shards)."""
    path = pathlib.Path(path)
    suffix = _suffix(path)
    if suffix in (".txt", ".txt.gz"):
        with _open_text(path) as f:
            text = f.read()
        if txt_mode == "file":
            docs = [text]
        elif txt_mode == "paragraph":
            docs = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
        elif txt_mode == "line":
            docs = [ln for ln in text.splitlines() if ln.strip()]
        else:
            raise ValueError(f"txt_mode: {txt_mode!r}; choose one of ['file', 'paragraph', 'line']")
        for i in range(0, len(docs), batch_docs):
            yield docs[i : i + batch_docs]
    elif suffix in (".jsonl", ".jsonl.gz"):
        batch: list[str] = []
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or text_field not in row:
                    fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise KeyError(f"{path}:{n}: no field {text_field!r} (--text-field); fields: {fields}")
                if not isinstance(row[text_field], str):
                    raise TypeError(f"{path}:{n}: field {text_field!r} is {type(row[text_field]).__name__}, not text")
                batch.append(row[text_field])
                if len(batch) == batch_docs:
                    yield batch
                    batch = []
        if batch:
            yield batch
    else:  # parquet
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise KeyError(f"{path}: no column {text_field!r} (--text-field); columns: {pf.schema_arrow.names}")
        for rb in pf.iter_batches(batch_size=batch_docs, columns=[text_field]):
            docs = [t for t in rb.column(0).to_pylist() if t is not None]
            if docs:
                yield docs


def _expand_inputs(inputs: Sequence[str]) -> list[pathlib.Path]:
    import glob

    files: list[pathlib.Path] = []
    for pat in inputs:
        p = pathlib.Path(pat)
        if p.is_dir():
            hits = sorted(str(q) for q in p.rglob("*") if q.is_file())
            hits = [h for h in hits if any(h.lower().endswith(s) for s in SUFFIXES)]
        else:
            hits = sorted(glob.glob(str(pat), recursive=True))
        if not hits:
            raise FileNotFoundError(f"no input file matches {pat!r}")
        files += [pathlib.Path(h) for h in hits]
    seen, out = set(), []
    for f in files:
        _suffix(f)  # unsupported types fail before any work starts
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# writer

_WORKER: dict = {}


def _worker_init(tok_json: str, settings: dict, encoder: dict):
    from tokenizers import Tokenizer

    # parallelism is over input files (--workers); one tokenizer thread per process keeps cores independent
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tok"] = tok = Tokenizer.from_str(tok_json)
    _WORKER["settings"] = settings
    _WORKER["encoder"] = encoder
    if encoder["spec"] is not None:
        from canon_jax.data.tiktoken_bpe import TiktokenBPE

        _WORKER["fast"] = TiktokenBPE(encoder["spec"], tok)


def _shard_names(out: pathlib.Path, k: int):
    return out / f"tokens-{k:05d}.bin", out / f"docs-{k:05d}.npy", out / f"tokens-{k:05d}.done"


def _source_info(path: pathlib.Path) -> dict:
    st = path.stat()
    return {"source": str(path), "source_bytes": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def _tokenize_file(job) -> dict:
    """Tokenise input ``job = (k, path, out_dir)`` into shard ``k``; returns its marker dict."""
    k, path, out = job
    tok, s = _WORKER["tok"], _WORKER["settings"]
    fast, mode, n_check = _WORKER.get("fast"), _WORKER["encoder"]["mode"], _WORKER["encoder"]["verify_docs"]
    notice = None
    path, out = pathlib.Path(path), pathlib.Path(out)
    bin_path, docs_path, done_path = _shard_names(out, k)
    dtype = np.dtype(s["dtype"])
    bos, eos = s["bos_id"], s["eos_id"]
    t0 = time.perf_counter()
    tmp_bin = bin_path.with_name(bin_path.name + f".tmp{os.getpid()}")
    offsets = [0]
    n_tok = 0
    with open(tmp_bin, "wb") as f:
        for docs in iter_document_batches(path, s["text_field"], s["txt_mode"], s["batch_docs"]):
            if fast is None:
                encs = [e.ids for e in tok.encode_batch_fast(docs, add_special_tokens=False)]
            else:
                encs = fast.encode_batch(docs)
                if n_check > 0:  # the first documents of every file, encoded both ways, must agree
                    ref = [e.ids for e in tok.encode_batch_fast(docs[:n_check], add_special_tokens=False)]
                    bad = next((i for i, (a, b) in enumerate(zip(encs, ref)) if list(a) != b), None)
                    n_check = 0
                    if bad is not None:
                        notice = (
                            f"{path}: document {bad}: the tiktoken encoder gives other ids than tokenizers "
                            f"({[int(t) for t in encs[bad][:8]]}... vs {ref[bad][:8]}...)"
                        )
                        if mode == "tiktoken":
                            raise ValueError(notice + "; --encoder tiktoken cannot be used for this tokenizer")
                        notice += "; this file is encoded with tokenizers"
                        fast = None
                        encs = [e.ids for e in tok.encode_batch_fast(docs, add_special_tokens=False)]
            lens = np.fromiter((len(e) for e in encs), np.int64, len(encs)) + (bos is not None) + (eos is not None)
            flat = np.empty(int(lens.sum()), dtype)
            ends = np.cumsum(lens)
            starts = ends - lens
            for ids, a in zip(encs, starts):
                a = int(a)
                if bos is not None:
                    flat[a] = bos
                    a += 1
                flat[a : a + len(ids)] = ids
                if eos is not None:
                    flat[a + len(ids)] = eos
            f.write(flat.tobytes())
            offsets.extend((n_tok + ends).tolist())
            n_tok += int(flat.size)
    tmp_docs = docs_path.with_name(docs_path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp_docs, np.asarray(offsets, np.int64))
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_docs, docs_path)
    marker = {
        **_source_info(path),
        "settings": s["hash"],
        "num_tokens": n_tok,
        "num_docs": len(offsets) - 1,
        "seconds": time.perf_counter() - t0,
        "encoder": "hf" if fast is None else "tiktoken",
    }
    if notice is not None:
        marker["notice"] = notice
    tmp_done = done_path.with_name(done_path.name + f".tmp{os.getpid()}")
    tmp_done.write_text(json.dumps(marker))
    os.replace(tmp_done, done_path)
    return {"k": k, **marker}


def _marker_ok(out: pathlib.Path, k: int, path: pathlib.Path, settings_hash: str, dtype: np.dtype):
    bin_path, docs_path, done_path = _shard_names(out, k)
    if not done_path.exists():
        return None
    try:
        m = json.loads(done_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    info = _source_info(path)
    if any(m.get(key) != v for key, v in info.items()) or m.get("settings") != settings_hash:
        return None
    if not bin_path.exists() or bin_path.stat().st_size != m["num_tokens"] * dtype.itemsize or not docs_path.exists():
        return None
    return {"k": k, **m}


def tokenize_corpus(
    inputs: Sequence[str],
    out_dir,
    tokenizer=None,
    *,
    text_field: str = "text",
    txt_mode: str = "file",
    add_bos: bool = True,
    add_eos: bool = True,
    bos_token=None,
    eos_token=None,
    workers: int = 1,
    batch_docs: int = 1024,
    encoder: str = "auto",
    verify_docs: int = 16,
    progress: bool = True,
    log=print,
) -> dict:
    """Tokenise ``inputs`` (files, globs or directories of .txt/.jsonl(.gz)/.parquet) into ``out_dir``.

    ``tokenizer``: a ``tokenizer.json`` path, a ``tokenizers.Tokenizer``, or None (the built-in byte-level one).
    ``workers`` processes tokenise whole input files in parallel. Returns the index dict (also ``index.json``).

    ``encoder``: ``"hf"`` encodes with ``tokenizers``; ``"tiktoken"`` with ``tiktoken``'s BPE, for the byte-level
    BPE tokenizers it reproduces exactly (:mod:`canon_jax.data.tiktoken_bpe`; an error for others); ``"auto"``
    (default) uses ``tiktoken`` when it is exact, else ``tokenizers``. Either way the first ``verify_docs``
    documents of every file are encoded both ways and must agree (``auto`` falls back to ``tokenizers`` for that
    file, with a notice; ``tiktoken`` raises). The ids do not depend on the encoder, so it is not part of the
    settings a resumed run must share; the index records which one wrote each shard.
    """
    from canon_jax.data.tiktoken_bpe import ENCODERS, NotConvertible, tiktoken_spec
    from canon_jax.train.text_data import _BOS_NAMES, _EOS_NAMES, _special_id, load_tokenizer

    if encoder not in ENCODERS:
        raise ValueError(f"--encoder: {encoder!r}; choose one of {list(ENCODERS)}")
    if verify_docs < 0:
        raise ValueError(f"verify_docs must be >= 0, got {verify_docs}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if batch_docs < 1:
        raise ValueError(f"batch_docs must be >= 1, got {batch_docs}")
    if txt_mode not in ("file", "paragraph", "line"):
        raise ValueError(f"txt_mode: {txt_mode!r}; choose one of ['file', 'paragraph', 'line']")
    tok = tokenizer if hasattr(tokenizer, "encode_batch") else load_tokenizer(tokenizer)
    files = _expand_inputs(inputs)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    bos = _special_id(tok, bos_token, _BOS_NAMES, "bos") if add_bos else None
    eos = _special_id(tok, eos_token, _EOS_NAMES, "eos") if add_eos else None
    tok_hash = tokenizer_sha256(tok)
    settings = {
        "dtype": dtype.name,
        "bos_id": bos,
        "eos_id": eos,
        "text_field": text_field,
        "txt_mode": txt_mode,
        "tokenizer_sha256": tok_hash,
    }
    settings["hash"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    settings["batch_docs"] = batch_docs
    # a directory holds one corpus: refuse to mix settings (another tokenizer, BOS/EOS, field) into it
    stamp = out / "settings.json"
    if stamp.exists():
        old = json.loads(stamp.read_text())
        if old.get("hash") != settings["hash"]:
            diff = sorted(k for k in settings if k not in ("hash", "batch_docs") and old.get(k) != settings[k])
            raise ValueError(
                f"{out} already holds shards written with other settings ({diff}); use a new output directory"
            )
    else:
        stamp.write_text(json.dumps({k: v for k, v in settings.items() if k != "batch_docs"}, indent=1))
    (out / "index.json").unlink(missing_ok=True)  # rewritten when every shard is done

    done: dict[int, dict] = {}
    todo = []
    for k, f in enumerate(files):
        m = _marker_ok(out, k, f, settings["hash"], dtype)
        if m is None:
            todo.append((k, str(f), str(out)))
        else:
            done[k] = m
    if done:
        log(f"resuming: {len(done)} of {len(files)} input file(s) already tokenised")
    spec = None
    if encoder != "hf" and todo:
        try:
            spec = tiktoken_spec(tok)
        except NotConvertible as e:
            if encoder == "tiktoken":
                raise ValueError(f"--encoder tiktoken: the tokenizer cannot be converted exactly: {e}") from None
            log(f"encoder: tokenizers (the tiktoken fast path does not apply: {e})")
    enc_args = {"mode": encoder, "spec": spec, "verify_docs": verify_docs}
    total_bytes = sum(f.stat().st_size for f in files)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", dynamic_ncols=True)
        bar.update(sum(files[k].stat().st_size for k in done))
    t0 = time.perf_counter()
    new_tokens = 0
    tok_json = tok.to_str()

    def _record(m):
        nonlocal new_tokens
        done[m["k"]] = m
        new_tokens += m["num_tokens"]
        if m.get("notice"):
            log(f"notice: {m['notice']}")
        if bar is not None:
            bar.update(m["source_bytes"])
            bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.3g}")

    if workers == 1 or len(todo) <= 1:
        old_env = os.environ.get("TOKENIZERS_PARALLELISM")
        try:
            _worker_init(tok_json, settings, enc_args)
            for job in todo:
                _record(_tokenize_file(job))
        finally:
            _WORKER.clear()
            if old_env is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = old_env
    else:
        import multiprocessing as mp

        # spawn: the parent's tokenizer thread pool must not be forked; workers rebuild it from JSON
        with mp.get_context("spawn").Pool(
            min(workers, len(todo)), _worker_init, (tok_json, settings, enc_args)
        ) as pool:
            for m in pool.imap_unordered(_tokenize_file, todo):
                _record(m)
    if bar is not None:
        bar.close()
    dt = time.perf_counter() - t0
    shards = []
    for k, f in enumerate(files):
        m = done[k]
        shards.append(
            {
                "tokens": _shard_names(out, k)[0].name,
                "docs": _shard_names(out, k)[1].name,
                "source": str(f),
                "source_bytes": m["source_bytes"],
                "num_tokens": m["num_tokens"],
                "num_docs": m["num_docs"],
                "encoder": m.get("encoder", "hf"),
            }
        )
    used = sorted({s["encoder"] for s in shards})
    index = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "tokenizer_sha256": tok_hash,
        "bos_id": bos,
        "eos_id": eos,
        "text_field": text_field,
        "txt_mode": txt_mode,
        # ids are the same with either encoder; this records which library wrote the shards
        "encoder": used[0] if len(used) == 1 else "mixed",
        "encoder_requested": encoder,
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_docs": sum(s["num_docs"] for s in shards),
        "shards": shards,
    }
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / "index.json")
    log(
        f"tokenized {len(todo)} file(s), {new_tokens} tokens in {dt:.2f} s "
        f"({new_tokens / max(dt, 1e-9):.4g} tokens/s, workers={workers}, encoder={index['encoder']}); "
        f"corpus: {index['num_tokens']} tokens, "
        f"{index['num_docs']} documents, {len(shards)} shard(s), {dtype.name} -> {out}"
    )
    index["seconds"] = dt
    index["new_tokens"] = new_tokens
    return index


# ----------------------------------------------------------------------------------------------------------------------
# reader


class TokenShards:
    """Random access to a token directory: ``read(start, n)`` tokens of the concatenated corpus and the document
    structure of any range, without loading the corpus (positional reads; memory-mapped document offsets).

    Safe to share between threads (``os.pread`` has no file position).
    """

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        idx = self.directory / "index.json"
        if not idx.exists():
            hint = (
                " (tokenization unfinished: rerun it to resume)" if (self.directory / "settings.json").exists() else ""
            )
            raise FileNotFoundError(f"{self.directory}: no index.json; not a token directory{hint}")
        self.index = json.loads(idx.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{idx}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        if self.index.get("version") != VERSION:
            raise ValueError(f"{idx}: version {self.index.get('version')}, this reader reads {VERSION}")
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size = int(self.index["vocab_size"])
        counts = []
        for s in self.index["shards"]:
            p = self.directory / s["tokens"]
            if not p.exists():
                raise FileNotFoundError(f"{self.directory}: shard {s['tokens']} listed in index.json is missing")
            if p.stat().st_size != s["num_tokens"] * self.dtype.itemsize:
                raise ValueError(
                    f"{p}: {p.stat().st_size} bytes, index.json says {s['num_tokens']} "
                    f"{self.dtype.name} tokens; the directory is damaged"
                )
            counts.append(int(s["num_tokens"]))
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        self._fds: list = [None] * len(counts)
        self._docs: list = [None] * len(counts)
        self._lock = threading.Lock()  # grain's read threads open shards lazily

    def __len__(self):
        return self.num_tokens

    def __getstate__(self):  # picklable for grain worker processes: reopen files there
        return {"directory": str(self.directory)}

    def __setstate__(self, state):
        self.__init__(state["directory"])

    def close(self):
        for i, fd in enumerate(self._fds):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                self._fds[i] = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def _fd(self, k: int) -> int:
        fd = self._fds[k]
        if fd is None:
            with self._lock:
                fd = self._fds[k]
                if fd is None:
                    fd = self._fds[k] = os.open(self.directory / self.index["shards"][k]["tokens"], os.O_RDONLY)
        return fd

    def doc_offsets(self, k: int) -> np.ndarray:
        """Document offsets of shard ``k`` (memory-mapped int64 ``[num_docs + 1]``)."""
        d = self._docs[k]
        if d is None:
            with self._lock:
                d = self._docs[k]
                if d is None:
                    d = self._docs[k] = np.load(self.directory / self.index["shards"][k]["docs"], mmap_mode="r")
        return d

    def memmap(self, k: int) -> np.ndarray:
        """Shard ``k``'s tokens as a read-only ``np.memmap`` (for inspection; the loader uses :meth:`read`)."""
        return np.memmap(self.directory / self.index["shards"][k]["tokens"], dtype=self.dtype, mode="r")

    def _shards_of(self, lo: int, hi: int):
        k = int(np.searchsorted(self.starts, lo, side="right")) - 1
        while k < len(self._fds) and self.starts[k] < hi:
            yield k, int(self.starts[k])
            k += 1

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens ``[start, start + n)`` of the corpus (a fresh array of the corpus dtype)."""
        if start < 0 or n < 0 or start + n > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + n}) outside the corpus of {self.num_tokens}")
        out = np.empty(n, self.dtype)
        view = memoryview(out).cast("B")
        isz = self.dtype.itemsize
        for k, base in self._shards_of(start, start + n):
            a = max(start, base)
            b = min(start + n, int(self.starts[k + 1]))
            if b <= a:
                continue
            nbytes = (b - a) * isz
            off = (a - start) * isz
            got = os.preadv(self._fd(k), [view[off : off + nbytes]], (a - base) * isz)
            if got != nbytes:
                raise OSError(f"short read from shard {k} of {self.directory}: {got} of {nbytes} bytes")
        return out

    def document_starts(self, lo: int, hi: int) -> np.ndarray:
        """Global offsets of the documents overlapping ``[lo, hi)``: the start of the one holding ``lo`` (<= lo),
        then every document start in ``(lo, hi)``, increasing."""
        out = []
        for k, base in self._shards_of(lo, hi):
            d = self.doc_offsets(k)
            a, b = max(lo - base, 0), min(hi - base, int(self.starts[k + 1]) - base)
            if b <= a:
                continue
            i0 = int(np.searchsorted(d, a, side="right")) - 1  # the document holding a
            i1 = int(np.searchsorted(d, b, side="left"))  # first document starting at or after b
            out.append(np.asarray(d[max(i0, 0) : i1], np.int64) + base)
        starts = np.concatenate(out) if out else np.zeros((0,), np.int64)
        return starts
