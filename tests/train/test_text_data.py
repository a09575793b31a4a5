"""Real-text input: readers, byte-level tokenizer, BOS/EOS packing, windows, process sharding, iterator resume."""

import json

import chex
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canon_jax.train.config import DataSection, TextDataSection
from canon_jax.train.text_data import (
    TokenStream,
    byte_level_tokenizer,
    load_tokenizer,
    make_text_dataset,
    read_documents,
)

DOCS = ["héllo wörld", "second doc\nwith two lines", "x" * 50, "", "last one"]


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[:2])))
    pq.write_table(pa.table({"text": DOCS[2:4]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text(DOCS[4])
    return tmp_path


def test_readers_in_order(files):
    docs = read_documents([str(files / "a.jsonl"), str(files / "b.parquet"), str(files / "c.txt")])
    assert docs == DOCS
    (files / "p.txt").write_text("para one\nstill one\n\n\npara two\n")
    assert read_documents([str(files / "p.txt")], txt_mode="paragraph") == ["para one\nstill one", "para two"]
    assert read_documents([str(files / "p.txt")], txt_mode="line") == ["para one", "still one", "para two"]
    with pytest.raises(KeyError, match="no field 'body'"):
        read_documents([str(files / "a.jsonl")], text_field="body")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        read_documents([str(files / "missing*.jsonl")])
    (files / "d.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_documents([str(files / "d.csv")])


def test_byte_level_tokenizer_is_bytes_plus_three():
    tok = byte_level_tokenizer()
    assert tok.get_vocab_size() == 259
    for text in DOCS + ["\x00\xff tab\t ünïcode 🙂"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == [3 + b for b in text.encode("utf-8")]
        assert tok.decode(ids) == text
    assert (tok.token_to_id("<pad>"), tok.token_to_id("<bos>"), tok.token_to_id("<eos>")) == (0, 1, 2)


def test_tokenizer_file_round_trip(tmp_path):
    path = tmp_path / "tokenizer.json"
    byte_level_tokenizer().save(str(path))
    tok = load_tokenizer(str(path))
    assert tok.encode("abc", add_special_tokens=False).ids == [100, 101, 102]
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_stream_and_windows_cover_every_transition_once():
    tok = byte_level_tokenizer()
    s = TokenStream(DOCS, tok)
    expected = []
    for d in DOCS:
        expected += [1] + [3 + b for b in d.encode()] + [2]
    np.testing.assert_array_equal(s.tokens, expected)
    L = 16
    n = s.num_windows(L)
    assert n == (len(expected) - 1) // L
    pairs = []
    for i in range(n):
        w = s.window(i, L)
        for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions"):
            chex.assert_shape(w[k], (L,))
        np.testing.assert_array_equal(w["targets"][:-1], w["inputs"][1:])
        pairs += list(zip(w["inputs"], w["targets"]))
        # segments restart at each BOS; positions count from the document start
        starts = np.flatnonzero(w["inputs"] == 1)
        for t in range(L):
            if t in starts:
                assert w["positions"][t] == 0
            elif t > 0:
                assert w["positions"][t] == w["positions"][t - 1] + 1
        np.testing.assert_array_equal(np.diff(w["segment_ids"]), (w["inputs"][1:] == 1).astype(int))
        assert w["segment_ids"][0] == 1
    assert pairs == list(zip(expected[:-1], expected[1:]))[: n * L]


def _cfg(files, **text):
    t = TextDataSection(
        train_files=[str(files / "*.jsonl"), str(files / "*.parquet"), str(files / "*.txt")],
        eval_files=[str(files / "c.txt")],
        **text,
    )
    return DataSection(kind="text", seq_len=8, seed=3, text=t)


def test_process_shards_are_disjoint_and_iterator_resumes(files):
    cfg = _cfg(files)
    full = make_text_dataset(cfg, split="train", batch_size=1)
    it = iter(full)
    one_epoch = {tuple(next(it)["inputs"][0]) for _ in range(10)}
    shards = []
    for p in range(2):
        it = iter(make_text_dataset(cfg, split="train", batch_size=2, process_index=p, process_count=2))
        b = next(it)
        chex.assert_shape(b["inputs"], (2, 8))
        shards.append({tuple(r) for r in b["inputs"]})
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] <= one_epoch
    # checkpointable: restore the state after 3 batches and get the same 4th..6th batches
    it = iter(make_text_dataset(cfg, split="train", batch_size=2))
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it)["inputs"] for _ in range(3)]
    it2 = iter(make_text_dataset(cfg, split="train", batch_size=2))
    it2.set_state(json.loads(json.dumps(state)))
    for w in want:
        np.testing.assert_array_equal(next(it2)["inputs"], w)


def test_bad_text_settings(files):
    with pytest.raises(ValueError, match="bos_token: '<s>' is not in the tokenizer"):
        make_text_dataset(_cfg(files, bos_token="<s>"), split="train", batch_size=1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_text_dataset(_cfg(files), split="train", batch_size=1000)
