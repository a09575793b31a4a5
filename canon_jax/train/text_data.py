"""Real-text pretraining input: local .txt / .jsonl / Parquet files -> tokenised, packed windows (grain).

Recipe (as the official lingua runs): each document becomes ``[BOS] + tokens + [EOS]``; documents are
concatenated into one stream in file order; window ``i`` is ``stream[i*L : i*L + L + 1]`` (``L = seq_len``), giving
``inputs = w[:-1]`` and ``targets = w[1:]`` (every next-token transition is trained once per epoch). Windows are
shuffled (reshuffled each epoch) and split across processes (process ``p`` reads windows ``p, p+P, ...``). The loss
mask is all ones; ``segment_ids`` number the documents inside the window from 1 and ``positions`` count within each
document (only used by segment-aware models; attention runs across documents by default, as in the paper).

Tokenizer: a Hugging Face ``tokenizers`` JSON file given by path, or the built-in byte-level tokenizer
(:func:`byte_level_tokenizer`: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, then the 256 bytes) when no path is given.
Nothing is downloaded.
"""

from __future__ import annotations

import glob
import json
import pathlib

import grain
import numpy as np

__all__ = ["byte_level_tokenizer", "load_tokenizer", "read_documents", "TokenStream", "make_text_dataset"]

_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "[BOS]", "<|bos|>")
_EOS_NAMES = ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[EOS]", "<|eos|>")


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character map used by byte-level BPE (printable bytes map to themselves)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_level_tokenizer():
    """A 259-token byte-level tokenizer: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, byte ``b`` = ``3 + b``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for b, ch in _bytes_to_unicode().items():
        vocab[ch] = len(specials) + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def load_tokenizer(path=None):
    """The tokenizer at ``path`` (a ``tokenizer.json`` file) or the built-in byte-level one when ``path`` is None."""
    if path is None:
        return byte_level_tokenizer()
    from tokenizers import Tokenizer

    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.text.tokenizer: tokenizer file not found: {p}")
    return Tokenizer.from_file(str(p))


def _special_id(tok, explicit, names, what):
    if explicit is not None:
        i = tok.token_to_id(explicit)
        if i is None:
            raise ValueError(f"data.text.{what}_token: {explicit!r} is not in the tokenizer's vocabulary")
        return i
    for n in names:
        i = tok.token_to_id(n)
        if i is not None:
            return i
    raise ValueError(f"data.text.{what}_token: the tokenizer has none of {list(names)}; set it explicitly")


def _expand(patterns) -> list[pathlib.Path]:
    files = []
    for pat in patterns:
        hits = sorted(glob.glob(str(pat), recursive=True))
        if not hits:
            raise FileNotFoundError(f"data.text: no file matches {pat!r}")
        files += [pathlib.Path(h) for h in hits]
    return files


def read_documents(patterns, text_field: str = "text", txt_mode: str = "file") -> list[str]:
    """Documents of every matched file, in order. ``.txt`` (per ``txt_mode``), ``.jsonl`` (one JSON object per line,
    text in ``text_field``), ``.parquet`` (column ``text_field``)."""
    docs: list[str] = []
    for f in _expand(patterns):
        suffix = f.suffix.lower()
        if suffix == ".txt":
            text = f.read_text(encoding="utf-8")
            if txt_mode == "file":
                docs.append(text)
            elif txt_mode == "paragraph":
                docs += [p.strip("\n") for p in text.split("\n\n") if p.strip()]
            elif txt_mode == "line":
                docs += [ln for ln in text.splitlines() if ln.strip()]
            else:
                raise ValueError(f"data.text.txt_mode: {txt_mode!r}; choose one of ['file', 'paragraph', 'line']")
        elif suffix == ".jsonl":
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if text_field not in row:
                    raise KeyError(f"{f}:{n}: no field {text_field!r} (data.text.text_field); fields: {sorted(row)}")
                docs.append(row[text_field])
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(f)
            if text_field not in table.column_names:
                raise KeyError(f"{f}: no column {text_field!r} (data.text.text_field); columns: {table.column_names}")
            docs += [t for t in table.column(text_field).to_pylist() if t is not None]
        else:
            raise ValueError(f"{f}: unsupported file type {suffix!r}; use .txt, .jsonl or .parquet")
    return docs


class TokenStream:
    """All documents as one packed token stream plus per-token document bookkeeping.

    Attributes: ``tokens`` int32 ``[N]``, ``doc`` int32 ``[N]`` (document index of each token), ``doc_start`` int64
    ``[num_docs]`` (stream offset of each document's first token).
    """

    def __init__(self, docs, tokenizer, add_bos=True, add_eos=True, bos_token=None, eos_token=None):
        bos = _special_id(tokenizer, bos_token, _BOS_NAMES, "bos") if add_bos else None
        eos = _special_id(tokenizer, eos_token, _EOS_NAMES, "eos") if add_eos else None
        pieces, lens = [], []
        for enc in tokenizer.encode_batch(list(docs), add_special_tokens=False):
            ids = ([bos] if add_bos else []) + list(enc.ids) + ([eos] if add_eos else [])
            pieces.append(np.asarray(ids, np.int32))
            lens.append(len(ids))
        self.tokens = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
        lens = np.asarray(lens, np.int64)
        self.doc_start = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        self.doc = np.repeat(np.arange(len(lens), dtype=np.int32), lens)

    def num_windows(self, seq_len: int) -> int:
        return max((len(self.tokens) - 1) // seq_len, 0)

    def window(self, i: int, seq_len: int) -> dict:
        """Example ``i``: ``inputs``/``targets``/``loss_mask``/``segment_ids``/``positions``, each ``[seq_len]``."""
        lo = i * seq_len
        w = self.tokens[lo : lo + seq_len + 1]
        idx = np.arange(lo, lo + seq_len)
        doc = self.doc[idx]
        return {
            "inputs": w[:-1].astype(np.int32),
            "targets": w[1:].astype(np.int32),
            "loss_mask": np.ones((seq_len,), np.float32),
            "segment_ids": (doc - doc[0] + 1).astype(np.int32),
            "positions": (idx - self.doc_start[doc]).astype(np.int32),
        }


def make_text_dataset(data_cfg, *, split: str, batch_size: int, process_index: int = 0, process_count: int = 1):
    """grain dataset of batches (dict of numpy ``[batch_size, seq_len]``) for ``split`` in {"train", "eval"}.

    ``train`` repeats forever with a per-epoch reshuffle (seed ``data.seed``); ``eval`` is one ordered pass. Its
    iterator is checkpointable (``get_state``/``set_state``).
    """
    t = data_cfg.text
    files = t.train_files if split == "train" else t.eval_files
    if not files:
        raise ValueError(f"data.text.{'train' if split == 'train' else 'eval'}_files: no files for split {split!r}")
    stream = TokenStream(
        read_documents(files, t.text_field, t.txt_mode),
        load_tokenizer(t.tokenizer),
        t.add_bos,
        t.add_eos,
        t.bos_token,
        t.eos_token,
    )
    seq_len = data_cfg.seq_len
    n = stream.num_windows(seq_len)
    if n < process_count * batch_size:
        raise ValueError(
            f"data.text.{'train' if split == 'train' else 'eval'}_files: {len(stream.tokens)} tokens give {n} "
            f"windows of seq_len {seq_len}, fewer than "
            f"one global batch ({process_count} x {batch_size}); add text or lower data.seq_len"
        )
    ds = grain.MapDataset.range(n)
    if split == "train":
        ds = ds.shuffle(seed=data_cfg.seed).repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.map(lambda i: stream.window(int(i), seq_len)).batch(batch_size, drop_remainder=True)
    read = grain.ReadOptions(num_threads=max(data_cfg.num_workers, 1), prefetch_buffer_size=4)
    return ds.to_iter_dataset(read)
