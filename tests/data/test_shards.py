"""Pre-tokenised token directories: tokenize (readers, BOS/EOS, dtype, index, parallel, resume) and random access."""

import gzip
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canon_jax.data import cli, shards
from canon_jax.data.shards import TokenShards, token_dtype, tokenize_corpus
from canon_jax.train.text_data import byte_level_tokenizer

DOCS_A = ["héllo wörld", "second doc\nwith two lines", "x" * 50]
DOCS_B = ["parquet one", "", "parquet three 🙂"]
TXT = "para one\nstill one\n\npara two\n"


def _inputs(root: pathlib.Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, d in enumerate(DOCS_A):
            f.write(json.dumps({"text": d, "id": i}) + "\n\n")
    pq.write_table(pa.table({"text": DOCS_B[:2] + [None] + DOCS_B[2:]}), root / "b.parquet", row_group_size=2)
    (root / "c.txt").write_text(TXT)
    return [str(root / "a.jsonl.gz"), str(root / "b.parquet"), str(root / "c.txt")]


def _expected_docs(txt_mode="paragraph"):
    txt = ["para one\nstill one", "para two"] if txt_mode == "paragraph" else [TXT]
    return DOCS_A + DOCS_B + txt


def _reference_stream(docs, bos=1, eos=2):
    """[BOS] + UTF-8 bytes + 3 + [EOS] per document: the byte-level tokenizer by its definition."""
    pieces = [[bos] + [3 + b for b in d.encode("utf-8")] + [eos] for d in docs]
    offsets = np.cumsum([0] + [len(p) for p in pieces])
    return np.asarray([t for p in pieces for t in p]), offsets


def test_tokenize_matches_reference_and_index(tmp_path):
    ins = _inputs(tmp_path / "in")
    out = tmp_path / "tok"
    index = tokenize_corpus(ins, out, txt_mode="paragraph", batch_docs=2, progress=False, log=lambda *_: None)
    stream, offsets = _reference_stream(_expected_docs())
    ts = TokenShards(out)
    assert ts.dtype == np.uint16 and ts.vocab_size == 259 and len(ts) == len(stream)
    np.testing.assert_array_equal(ts.read(0, len(ts)), stream)
    assert index["num_docs"] == len(_expected_docs()) == len(offsets) - 1
    assert [s["source"] for s in index["shards"]] == ins
    assert [s["num_docs"] for s in index["shards"]] == [3, 3, 2]
    assert index["tokenizer_sha256"] == shards.tokenizer_sha256(byte_level_tokenizer())
    assert (index["bos_id"], index["eos_id"]) == (1, 2)
    # the raw shard files are plain memmap-able arrays and the docs files their document offsets
    np.testing.assert_array_equal(np.concatenate([ts.memmap(k) for k in range(3)]), stream)
    got_offsets = np.concatenate([ts.doc_offsets(k)[:-1] + ts.starts[k] for k in range(3)] + [[len(ts)]])
    np.testing.assert_array_equal(got_offsets, offsets)


def test_no_bos_eos_and_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    ins = _inputs(tmp_path / "in")
    tokenize_corpus(ins, tmp_path / "t", add_bos=False, add_eos=False, progress=False, log=lambda *_: None)
    ts = TokenShards(tmp_path / "t")
    np.testing.assert_array_equal(
        ts.read(0, len(ts)), [3 + b for d in _expected_docs("file") for b in d.encode("utf-8")]
    )
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    words = [f"w{i}" for i in range(70000)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "w.jsonl").write_text(json.dumps({"text": "w0 w69999 nope"}) + "\n")
    tokenize_corpus([str(tmp_path / "w.jsonl")], tmp_path / "w", tok, progress=False, log=lambda *_: None)
    tw = TokenShards(tmp_path / "w")
    assert tw.dtype == np.uint32
    np.testing.assert_array_equal(tw.read(0, len(tw)), [1, 3, 70002, 0, 2])


def test_parallel_workers_write_identical_shards(tmp_path):
    ins = _inputs(tmp_path / "in")
    tokenize_corpus(ins, tmp_path / "w1", progress=False, log=lambda *_: None)
    tokenize_corpus(ins, tmp_path / "w2", workers=2, progress=False, log=lambda *_: None)
    for name in ("tokens-00000.bin", "tokens-00001.bin", "tokens-00002.bin", "docs-00001.npy"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    i1, i2 = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("w1", "w2"))
    assert i1 == i2


def test_resume_after_interruption(tmp_path, monkeypatch):
    ins = _inputs(tmp_path / "in")
    out = tmp_path / "tok"
    real = shards._tokenize_file
    calls = []

    def dies_on_second(job):
        calls.append(job[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted mid-run
        return real(job)

    monkeypatch.setattr(shards, "_tokenize_file", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(ins, out, progress=False, log=lambda *_: None)
    assert (out / "tokens-00000.done").exists() and not (out / "tokens-00001.done").exists()
    with pytest.raises(FileNotFoundError, match="unfinished: rerun it to resume"):
        TokenShards(out)
    calls.clear()
    monkeypatch.setattr(shards, "_tokenize_file", lambda job: (calls.append(job[0]), real(job))[1])
    logs = []
    tokenize_corpus(ins, out, progress=False, log=logs.append)
    assert calls == [1, 2] and "1 of 3" in logs[0]
    tokenize_corpus(ins, tmp_path / "fresh", progress=False, log=lambda *_: None)
    np.testing.assert_array_equal(
        TokenShards(out).read(0, len(TokenShards(out))),
        TokenShards(tmp_path / "fresh").read(0, len(TokenShards(tmp_path / "fresh"))),
    )
    # a changed input is re-tokenised; nothing else is
    (tmp_path / "in" / "c.txt").write_text("changed text")
    calls.clear()
    tokenize_corpus(ins, out, progress=False, log=lambda *_: None)
    assert calls == [2]
    ts = TokenShards(out)
    np.testing.assert_array_equal(
        ts.read(ts.starts[2], ts.starts[3] - ts.starts[2]), _reference_stream(["changed text"])[0]
    )
    with pytest.raises(ValueError, match="other settings.*eos_id"):
        tokenize_corpus(ins, out, add_eos=False, progress=False, log=lambda *_: None)


def test_bad_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError, match=r"a.jsonl:2: no field 'text'"):
        tokenize_corpus([str(tmp_path / "a.jsonl")], tmp_path / "o1", progress=False, log=lambda *_: None)
    (tmp_path / "b.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"b.jsonl:1: not valid JSON"):
        tokenize_corpus([str(tmp_path / "b.jsonl")], tmp_path / "o2", progress=False, log=lambda *_: None)
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported input type"):
        tokenize_corpus([str(tmp_path / "c.csv")], tmp_path / "o3", progress=False, log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="no input file matches"):
        tokenize_corpus([str(tmp_path / "none*.jsonl")], tmp_path / "o4", progress=False, log=lambda *_: None)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(KeyError, match="no column 'text'"):
        tokenize_corpus([str(tmp_path / "d.parquet")], tmp_path / "o5", progress=False, log=lambda *_: None)
    with pytest.raises(SystemExit, match="--workers must be >= 1"):
        cli.main(["tokenize", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o6"), "--workers", "0"])


def test_damaged_directory_is_reported(tmp_path):
    ins = _inputs(tmp_path / "in")
    tokenize_corpus(ins, tmp_path / "t", progress=False, log=lambda *_: None)
    with open(tmp_path / "t" / "tokens-00001.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="tokens-00001.bin: .* the directory is damaged"):
        TokenShards(tmp_path / "t")


def test_cli_tokenize_and_random_access(tmp_path):
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdef ")) for _ in range(rng.integers(0, 40))) for _ in range(60)]
    for k in range(3):
        (tmp_path / f"part{k}.jsonl").write_text(
            "".join(json.dumps({"t": d}) + "\n" for d in docs[20 * k : 20 * k + 20])
        )
    assert (
        cli.main(
            [
                "tokenize",
                str(tmp_path / "part*.jsonl"),
                "--out",
                str(tmp_path / "tok"),
                "--text-field",
                "t",
                "--no-progress",
            ]
        )
        == 0
    )
    ts = TokenShards(tmp_path / "tok")
    stream, offsets = _reference_stream(docs)
    doc_of = np.repeat(np.arange(len(docs)), np.diff(offsets))
    for _ in range(200):  # reads and document structure of random ranges, across shard boundaries
        lo = int(rng.integers(0, len(stream)))
        hi = int(rng.integers(lo + 1, len(stream) + 1))
        np.testing.assert_array_equal(ts.read(lo, hi - lo), stream[lo:hi])
        want = offsets[np.unique(doc_of[lo:hi])]
        np.testing.assert_array_equal(np.unique(ts.document_starts(lo, hi)), want)
    with pytest.raises(IndexError, match="outside the corpus"):
        ts.read(len(stream) - 1, 2)
