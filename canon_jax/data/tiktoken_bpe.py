"""A faster encoder for byte-level BPE ``tokenizer.json`` files: the same ids from ``tiktoken``'s BPE.

Hugging Face ``tokenizers`` encodes a trained byte-level BPE at ~0.5-0.8 M tokens per CPU-second; ``tiktoken`` runs
the same algorithm several times faster (docs/benchmarks.md). :func:`tiktoken_spec` converts a ``tokenizer.json``
only when the conversion gives exactly the ids ``tokenizers`` gives, and says why not otherwise:

* model: BPE without dropout, unknown token, subword prefix/suffix, byte fallback or ``ignore_merges``; every one of
  the 256 byte characters in the vocabulary; every merge result a distinct, non-byte vocabulary entry;
* normaliser none; pre-tokeniser ``ByteLevel`` with ``use_regex`` (the GPT-2 split pattern, passed verbatim to
  ``tiktoken``'s regex engine); ``add_prefix_space`` is applied here the way ``ByteLevel`` applies it (a space is
  prepended unless the text starts with one); no truncation or padding; a post-processor that adds nothing when
  special tokens are off (``tokenize_corpus`` encodes with ``add_special_tokens=False``);
* ranks: a merge's rank is its position in the merge list (``tokenizers`` applies the lowest-ranked adjacent merge
  first, leftmost on ties; ``tiktoken`` merges the adjacent pair whose concatenation has the lowest rank, leftmost on
  ties). ``tiktoken`` also merges a pair ``(u, v)`` that is not in the merge list when ``u + v`` is a token. That can
  only happen if ``tokenizers`` itself, given ``u + v``'s bytes alone, stops at ``[u, v]``: restricted to the span of
  ``u`` and ``v`` the merge sequence is the same with or without the surrounding text. So every merge result ``T``
  is checked to encode to ``[T]`` with the ``tokenizers`` model; then the two algorithms make the same merge at
  every step, and ``tiktoken``'s whole-piece lookup returns what the merges would.

Documents the conversion does not cover are encoded with ``tokenizers`` (exact by definition): empty documents,
documents containing an added token's text (``tokenizers`` splits the text around added tokens first, and applies
``add_prefix_space`` to each part), and text that is not valid UTF-8 (lone surrogates). Whether the two regex
engines (Oniguruma in ``tokenizers``, fancy-regex in ``tiktoken``) split alike depends on their Unicode tables
only: the pattern's classes are letters, numbers, whitespace and the rest. :func:`split_probe` makes those classes
visible in the ids; the tests compare both encoders on a sample of code points and ``python -m
experiments.bench_text unicode`` on all of them. As a last guard, ``tokenize_corpus`` encodes the first documents of
every file both ways.
"""

from __future__ import annotations

import json
import re

import numpy as np

__all__ = ["ENCODERS", "GPT2_PATTERN", "NotConvertible", "TiktokenBPE", "tiktoken_spec", "split_probe"]

ENCODERS = ("auto", "hf", "tiktoken")

# the split pattern of the ByteLevel pre-tokeniser (use_regex=True) in Hugging Face tokenizers, and of GPT-2
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# post-processors whose output equals their input when add_special_tokens=False
_NEUTRAL_POST = {"ByteLevel", "TemplateProcessing", "RobertaProcessing", "BertProcessing"}


class NotConvertible(ValueError):
    """The tokenizer cannot be converted exactly; the message says which property prevents it."""


def _merge_pair(m) -> tuple[str, str]:
    if isinstance(m, str):
        parts = m.split(" ")
        if len(parts) != 2:
            raise NotConvertible(f"merge {m!r} is not two tokens")
        return parts[0], parts[1]
    if len(m) != 2:
        raise NotConvertible(f"merge {m!r} is not two tokens")
    return m[0], m[1]


def _check_post(post) -> None:
    if post is None:
        return
    if post.get("type") == "Sequence":
        for p in post.get("processors", []):
            _check_post(p)
        return
    if post.get("type") not in _NEUTRAL_POST:
        raise NotConvertible(f"post-processor {post.get('type')!r}")


def tiktoken_spec(tok) -> dict:
    """What :class:`TiktokenBPE` needs to reproduce ``tok`` (a ``tokenizers.Tokenizer``) exactly.

    Raises :class:`NotConvertible` naming the first property that rules the conversion out.
    """
    from canon_jax.train.text_data import _bytes_to_unicode

    try:
        import tiktoken  # noqa: F401
    except ImportError:
        raise NotConvertible("tiktoken is not installed") from None
    d = json.loads(tok.to_str())
    m = d.get("model") or {}
    if m.get("type") != "BPE":
        raise NotConvertible(f"model type {m.get('type')!r}, not BPE")
    for key, ok in (
        ("dropout", (None,)),
        ("unk_token", (None,)),
        ("continuing_subword_prefix", (None, "")),
        ("end_of_word_suffix", (None, "")),
        ("byte_fallback", (False, None)),
        ("ignore_merges", (False, None)),
    ):
        if m.get(key) not in ok:
            raise NotConvertible(f"BPE {key}={m.get(key)!r}")
    if d.get("normalizer") is not None:
        raise NotConvertible(f"normalizer {d['normalizer'].get('type')!r}")
    pre = d.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel":
        raise NotConvertible(f"pre-tokenizer {pre.get('type')!r}, not ByteLevel")
    if not pre.get("use_regex", True):
        raise NotConvertible("ByteLevel pre-tokenizer without use_regex")
    for key in ("truncation", "padding"):
        if d.get(key) is not None:
            raise NotConvertible(f"{key} is set")
    _check_post(d.get("post_processor"))

    b2u = _bytes_to_unicode()
    u2b = {c: b for b, c in b2u.items()}
    vocab: dict[str, int] = m["vocab"]
    ranks: dict[bytes, int] = {}
    byte_ids = []
    for b in range(256):
        if b2u[b] not in vocab:
            raise NotConvertible(f"byte {b} ({b2u[b]!r}) is not in the vocabulary")
        ranks[bytes([b])] = b
        byte_ids.append(vocab[b2u[b]])
    merge_ids, merged = [], []
    for i, pair in enumerate(m["merges"]):
        a, b = _merge_pair(pair)
        t = a + b
        if t not in vocab:
            raise NotConvertible(f"merge {i} result {t!r} is not in the vocabulary")
        try:
            key = bytes(u2b[c] for c in t)
        except KeyError:
            raise NotConvertible(f"merge {i} result {t!r} is not in the byte-level alphabet") from None
        if key in ranks:
            raise NotConvertible(f"merge {i} produces {t!r}, which a byte or an earlier merge already is")
        ranks[key] = 256 + i
        merge_ids.append(vocab[t])
        merged.append(t)
    rank_to_id = np.asarray(byte_ids + merge_ids, np.int64)
    if len(np.unique(rank_to_id)) != len(rank_to_id):
        raise NotConvertible("two byte or merge tokens share an id")
    # each merge result must be what tokenizers makes of its own bytes (see the module docstring)
    model = tok.model
    for t in merged:
        got = model.tokenize(t)
        if len(got) != 1 or got[0].value != t:
            raise NotConvertible(f"token {t!r} encodes to {[g.value for g in got]} with the merges alone")
    added = sorted({a["content"] for a in d.get("added_tokens") or [] if a.get("content")})
    return {
        "pat_str": GPT2_PATTERN,
        "ranks": ranks,
        "rank_to_id": rank_to_id,
        "prefix_space": bool(pre.get("add_prefix_space", False)),
        "added_tokens": added,
    }


class TiktokenBPE:
    """Encodes documents with ``tiktoken`` to the ids ``hf`` (the ``tokenizers.Tokenizer`` of ``spec``) gives."""

    def __init__(self, spec: dict, hf):
        import tiktoken

        self.hf = hf
        self.prefix_space = spec["prefix_space"]
        self.added = spec["added_tokens"]
        self._added_re = re.compile("|".join(map(re.escape, self.added))) if len(self.added) > 16 else None
        lut = spec["rank_to_id"]
        # ranks are the ids themselves when the ids follow the merge order (tokenizers' trainer numbers them so)
        # (a single byte's rank is never compared: only concatenations of two parts are looked up while merging)
        if bool(np.all(np.diff(lut[256:]) > 0)):
            ranks = {k: int(lut[r]) for k, r in spec["ranks"].items()}
            self.lut = None
        else:
            ranks = spec["ranks"]
            self.lut = lut.astype(np.uint32)
        self.enc = tiktoken.Encoding("canon-jax-bpe", pat_str=spec["pat_str"], mergeable_ranks=ranks, special_tokens={})

    def _has_added(self, doc: str) -> bool:
        if self._added_re is not None:
            return self._added_re.search(doc) is not None
        return any(a in doc for a in self.added)

    def encode_batch(self, docs: list[str]) -> list:
        """The ids of each document (a list or a uint32 array per document)."""
        out: list = [None] * len(docs)
        slow = []
        enc = self.enc.encode_ordinary
        for i, doc in enumerate(docs):
            if not doc or (self.added and self._has_added(doc)):
                slow.append(i)
                continue
            if self.prefix_space and doc[0] != " ":
                doc = " " + doc
            if not doc.isascii():
                try:
                    doc.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates: tiktoken would replace them, tokenizers decides
                    slow.append(i)
                    continue
            ids = enc(doc)
            out[i] = ids if self.lut is None else self.lut[np.asarray(ids, np.int64)]
        if slow:
            for i, e in zip(slow, self.hf.encode_batch_fast([docs[i] for i in slow], add_special_tokens=False)):
                out[i] = e.ids
        return out


def split_probe():
    """A ``tokenizers`` byte-level BPE that makes the split pattern's character classes visible in the ids, and the
    probe text for a character: the merges join ``a``, ``1`` and ``!`` with every byte, so ``x + c`` becomes one
    token only when the pattern keeps ``x`` and ``c`` in one piece (``c`` a letter, a number, or other, for the
    three probes; none for whitespace). Encoding every character's probe with both encoders compares the two
    regex engines' Unicode tables."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from canon_jax.train.text_data import _bytes_to_unicode

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = []
    for x in b"a1!":
        for b in range(256):
            merges.append((b2u[x], b2u[b]))
            vocab[b2u[x] + b2u[b]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return tok, lambda c: f"a{c}\n1{c}\n!{c}"
