"""The tiktoken encoder for byte-level BPE tokenizer.json files: ids equal to Hugging Face tokenizers', exactly."""

import json
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from canon_jax.data import tiktoken_bpe
from canon_jax.data.shards import TokenShards, tokenize_corpus
from canon_jax.data.tiktoken_bpe import NotConvertible, TiktokenBPE, tiktoken_spec
from canon_jax.train.text_data import _bytes_to_unicode, byte_level_tokenizer

SPECIALS = ["<pad>", "<bos>", "<eos>"]

# hand-written hard cases: contractions (and their upper-case forms, which the pattern does not split), whitespace
# runs of every kind, digits, punctuation runs, accents and combining marks, scripts without spaces, emoji with
# joiners and skin tones, long words, leading / trailing whitespace, empty documents, added-token text
HARD = [
    "",
    " ",
    "   ",
    "\n",
    "It's, we're, they've, I'm, you'll, he'd, don't. IT'S WE'RE 'S 'd'' ''",
    "tabs\tand\t\ttabs\n\nnew  lines   and    spaces \r\n windows\r\n",
    "nbsp\u00a0here\u2003em\u3000ideographic\u2028line\u2029para\u0085nel\x0bvt\x0cff",
    "digits 0 12 345 6789 3.14159 1,000,000 +49 (0)30 12345678901234567890 ٣٤٥ ①②③ ½",
    "punct!!! ??? ... --- ___ *** ((())) [[]] {{}} <<>> @#$%^&*~`|\\/ ;:; ,,, \"quoted\" 'single'",
    "héllo wörld ñandú façade naïve Œuvre straße İstanbul ǅemal",
    "e\u0301 a\u0300\u0316 combining\u0301\u0302\u0303 marks",
    "中文没有空格。日本語のテキスト、カタカナ。한국어 텍스트입니다.",
    "العربية نص مع أرقام ١٢٣ and עברית טקסט हिन्दी पाठ ไทยภาษา",
    "emoji 🙂🙃 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇩🇪🇫🇷 ❤️ keycap 1️⃣ ©®™",
    "supercalifragilisticexpialidocious " * 3 + "a" * 300 + " " + "xyz" * 100,
    "  leading spaces and trailing   ",
    "\n\n\nleading newlines",
    "trailing newlines\n\n\n",
    "mixed123abc456 abc123 123abc a1b2c3 ...a... 'quoted'word",
    "zero\u200bwidth\u200cjoiner\u200dchars\ufeffbom",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝐛𝐨𝐥𝐝 𓀀𓀁 𐍈 astral",
    "private \ue000\uf8ff and unassigned \u0378\u0379 and controls \x00\x01\x7f",
]


def _random_docs(n: int, seed: int = 0) -> list[str]:
    """Random documents over a pool mixing every character class the split pattern distinguishes."""
    rng = np.random.default_rng(seed)
    pool = list(
        "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 '  \t\n\r.,;:!?-_()[]\"'/\\@#éüßçñæøåΩπ中文字日本語한국"
        "ابتשלוםअआ🙂👍🏽\u200d\u0301\u00a0\u3000٣½①"
    )
    pool += ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "  ", "\n\n", "the ", " and", "ing"]
    return ["".join(rng.choice(pool, size=int(rng.integers(0, 80)))) for _ in range(n)]


def _train(docs, vocab_size=700, prefix_space=False) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return tok


@pytest.fixture(scope="module")
def corpus():
    return HARD + _random_docs(1500)


@pytest.fixture(scope="module")
def trained(corpus):
    return _train(corpus[: len(HARD)] + corpus[len(HARD) : len(HARD) + 500])


def _hf_ids(tok, docs):
    return [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]


def _fast_ids(tok, docs):
    return [list(map(int, ids)) for ids in TiktokenBPE(tiktoken_spec(tok), tok).encode_batch(docs)]


def _assert_same(tok, docs):
    want, got = _hf_ids(tok, docs), _fast_ids(tok, docs)
    for d, w, g in zip(docs, want, got):
        assert g == w, repr(d)


@pytest.mark.parametrize("prefix_space", [False, True])
def test_ids_equal_tokenizers_on_varied_text(corpus, prefix_space):
    tok = _train(corpus[:600], prefix_space=prefix_space)
    if prefix_space:  # as in GPT-2's tokenizer.json; adds nothing without special tokens
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    assert len(json.loads(tok.to_str())["model"]["merges"]) > 300
    # held-out documents, the hard cases, and the added tokens' text inside documents (encoded by tokenizers)
    docs = corpus + ["before<eos>after", "<bos>", "x <pad> y <eos>"]
    _assert_same(tok, docs)
    ids = _hf_ids(tok, ["a<eos>b"])[0]
    assert tok.token_to_id("<eos>") in ids


def test_non_special_added_tokens_and_permuted_ids(trained, corpus):
    tok = Tokenizer.from_str(trained.to_str())
    tok.add_tokens(["hello world", "ab"])
    _assert_same(tok, corpus[:200] + ["say hello world twice: hello world", "ab abab"])
    # ids that do not follow the merge order: the merge results' ids reversed (rank -> id lookup table)
    d = json.loads(trained.to_str())
    vocab = d["model"]["vocab"]
    merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in d["model"]["merges"]]
    old = [vocab[t] for t in merged]
    for t, i in zip(merged, old[::-1]):
        vocab[t] = i
    permuted = Tokenizer.from_str(json.dumps(d))
    assert TiktokenBPE(tiktoken_spec(trained), trained).lut is None  # the trainer numbers merges in order
    assert TiktokenBPE(tiktoken_spec(permuted), permuted).lut is not None
    assert _hf_ids(permuted, corpus[:50]) != _hf_ids(trained, corpus[:50])
    _assert_same(permuted, corpus)


def test_split_pattern_classes_every_character_alike():
    tok, probe = tiktoken_bpe.split_probe()
    # a letter joins 'a', a number '1', anything else '!', whitespace nothing
    merged = [[tok.id_to_token(i) for i in ids if i >= 256] for ids in _hf_ids(tok, [probe(c) for c in "b5,\u3000"])]
    assert merged == [["ab"], ["15"], ["!,"], []]
    # all of the BMP below U+3400 and a stride over the rest (experiments/bench_text.py `unicode` checks all)
    cps = list(range(0x3400)) + list(range(0x3400, 0x110000, 97))
    docs = [probe(chr(c)) for c in cps if not 0xD800 <= c < 0xE000]
    _assert_same(tok, docs)


def test_merges_tiktoken_would_apply_differently_are_refused():
    # 'bc' merges before 'ab', so tokenizers turns "abc" into [a, bc] and never uses the merge (ab, c);
    # tiktoken would join a + bc because their concatenation is a token
    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = [("b", "c"), ("a", "b"), ("ab", "c")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert [tok.id_to_token(i) for i in tok.encode("abc").ids] == ["a", "bc"]
    with pytest.raises(NotConvertible, match="'abc' encodes to \\['a', 'bc'\\]"):
        tiktoken_spec(tok)
    import tiktoken

    naive = tiktoken.Encoding(
        "naive",
        pat_str=tiktoken_bpe.GPT2_PATTERN,
        mergeable_ranks={bytes([b]): b for b in range(256)} | {b"bc": 256, b"ab": 257, b"abc": 258},
        special_tokens={},
    )
    assert naive.encode_ordinary("abc") == [258]  # what the check prevents


def _unsupported(trained):
    """Tokenizers the conversion must refuse, with the reason it must give."""
    d = json.loads(trained.to_str())
    out = {"use_regex": byte_level_tokenizer()}
    wl = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out["'WordLevel', not BPE"] = wl
    t = Tokenizer.from_str(trained.to_str())
    t.normalizer = normalizers.NFKC()
    out["normalizer 'NFKC'"] = t
    t = Tokenizer.from_str(trained.to_str())
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    out["'Metaspace', not ByteLevel"] = t
    t = Tokenizer.from_str(trained.to_str())
    t.enable_truncation(8)
    out["truncation is set"] = t
    for key, value in (("byte_fallback", True), ("dropout", 0.1), ("unk_token", "<pad>"), ("ignore_merges", True)):
        e = json.loads(json.dumps(d))
        e["model"][key] = value
        out[f"{key}={value!r}"] = Tokenizer.from_str(json.dumps(e))
    # two merges with the same result: tiktoken has one rank per token, tokenizers one per pair
    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)} | {"ab": 256, "bc": 257, "abc": 258}
    t = Tokenizer(models.BPE(vocab, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    out["merge 3 produces 'abc', which a byte or an earlier merge already is"] = t
    return out


def test_unsupported_tokenizers_are_refused(trained):
    for reason, tok in _unsupported(trained).items():
        with pytest.raises(NotConvertible, match=re.escape(reason)):
            tiktoken_spec(tok)


def _jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def test_tokenize_corpus_encoders(tmp_path, trained, corpus):
    ins = [_jsonl(tmp_path / f"in{k}.jsonl", corpus[k::3]) for k in range(3)]
    kw = dict(progress=False, log=lambda *_: None, batch_docs=64)
    ia = tokenize_corpus(ins, tmp_path / "auto", trained, **kw)
    ih = tokenize_corpus(ins, tmp_path / "hf", trained, encoder="hf", **kw)
    it = tokenize_corpus(ins, tmp_path / "tt", trained, encoder="tiktoken", workers=2, **kw)
    assert (ia["encoder"], ih["encoder"], it["encoder"]) == ("tiktoken", "hf", "tiktoken")
    assert [s["encoder"] for s in ia["shards"]] == ["tiktoken"] * 3
    assert ia["tokenizer_sha256"] == ih["tokenizer_sha256"] == it["tokenizer_sha256"]
    for k in range(3):
        for name in (f"tokens-{k:05d}.bin", f"docs-{k:05d}.npy"):
            ref = (tmp_path / "hf" / name).read_bytes()
            assert (tmp_path / "auto" / name).read_bytes() == ref and (tmp_path / "tt" / name).read_bytes() == ref
    # the reference ids, independently: [BOS] + tokenizers' ids + [EOS] per document, file by file
    bos, eos = trained.token_to_id("<bos>"), trained.token_to_id("<eos>")
    want = [t for k in range(3) for ids in _hf_ids(trained, corpus[k::3]) for t in [bos, *ids, eos]]
    ts = TokenShards(tmp_path / "auto")
    np.testing.assert_array_equal(ts.read(0, len(ts)), want)
    # a resumed run may use another encoder: the ids are the same
    logs = []
    tokenize_corpus(ins, tmp_path / "hf", trained, encoder="auto", log=logs.append, progress=False)
    assert "3 of 3" in logs[0]


def test_unsupported_tokenizer_falls_back(tmp_path, trained):
    ins = [_jsonl(tmp_path / "in.jsonl", ["héllo wörld", "x y z"])]
    tok = _unsupported(trained)["normalizer 'NFKC'"]
    logs = []
    idx = tokenize_corpus(ins, tmp_path / "o", tok, progress=False, log=logs.append)
    assert idx["encoder"] == "hf" and "fast path does not apply: normalizer 'NFKC'" in logs[0]
    ts = TokenShards(tmp_path / "o")
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    np.testing.assert_array_equal(
        ts.read(0, len(ts)), [t for ids in _hf_ids(tok, ["héllo wörld", "x y z"]) for t in [bos, *ids, eos]]
    )
    with pytest.raises(ValueError, match="--encoder tiktoken: .* normalizer"):
        tokenize_corpus(ins, tmp_path / "o2", tok, encoder="tiktoken", progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="--encoder: 'fast'"):
        tokenize_corpus(ins, tmp_path / "o3", tok, encoder="fast", progress=False, log=lambda *_: None)


def test_sample_mismatch_falls_back_or_raises(tmp_path, trained, corpus, monkeypatch):
    ins = [_jsonl(tmp_path / f"in{k}.jsonl", corpus[k::2][:100]) for k in range(2)]
    real = TiktokenBPE.encode_batch

    def wrong_on_third(self, docs):  # a fast encoder that disagrees on the third document
        out = real(self, docs)
        out[2] = list(out[2]) + [5]
        return out

    monkeypatch.setattr(TiktokenBPE, "encode_batch", wrong_on_third)
    logs = []
    idx = tokenize_corpus(ins, tmp_path / "o", trained, progress=False, log=logs.append)
    assert [s["encoder"] for s in idx["shards"]] == ["hf", "hf"] and idx["encoder"] == "hf"
    assert any("document 2: the tiktoken encoder gives other ids" in m for m in logs)
    bos, eos = trained.token_to_id("<bos>"), trained.token_to_id("<eos>")
    want = [t for k in range(2) for ids in _hf_ids(trained, corpus[k::2][:100]) for t in [bos, *ids, eos]]
    ts = TokenShards(tmp_path / "o")
    np.testing.assert_array_equal(ts.read(0, len(ts)), want)
    with pytest.raises(ValueError, match="--encoder tiktoken cannot be used"):
        tokenize_corpus(ins, tmp_path / "o2", trained, encoder="tiktoken", progress=False, log=lambda *_: None)
    # a mismatch after the checked documents is not looked for: verify_docs=2 misses the third document
    idx = tokenize_corpus(ins, tmp_path / "o3", trained, verify_docs=2, progress=False, log=lambda *_: None)
    assert idx["encoder"] == "tiktoken"


def test_lone_surrogates_are_left_to_tokenizers(trained):
    doc = "bad \ud800 text"
    with pytest.raises(Exception) as hf_err:
        trained.encode_batch([doc], add_special_tokens=False)
    with pytest.raises(type(hf_err.value)):
        TiktokenBPE(tiktoken_spec(trained), trained).encode_batch(["fine", doc])


def test_cli_encoder_flag(tmp_path, trained):
    from canon_jax.data import cli

    trained.save(str(tmp_path / "tokenizer.json"))
    ins = _jsonl(tmp_path / "in.jsonl", HARD)
    for enc in ("tiktoken", "hf"):
        argv = ["tokenize", ins, "--out", str(tmp_path / enc), "--tokenizer", str(tmp_path / "tokenizer.json")]
        assert cli.main([*argv, "--encoder", enc, "--no-progress"]) == 0
        assert json.loads((tmp_path / enc / "index.json").read_text())["encoder"] == enc
    shard = "tokens-00000.bin"
    assert (tmp_path / "hf" / shard).read_bytes() == (tmp_path / "tiktoken" / shard).read_bytes()
