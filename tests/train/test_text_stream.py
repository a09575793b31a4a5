"""Streamed token windows: windows/segments vs a reference, global shuffle, host sharding, exact resume (kill -9,
other process counts), validation split, and a trainer run on a token directory."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from canon_jax.data.shards import TokenShards, tokenize_corpus
from canon_jax.train.config import DataSection, TextDataSection
from canon_jax.train.text_stream import make_token_dataset

ROOT = pathlib.Path(__file__).parents[2]
L = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefgh ")) for _ in range(rng.integers(0, 60))) for _ in range(90)]
    for k in range(3):
        (root / f"p{k}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[30 * k : 30 * k + 30]))
    tokenize_corpus([str(root / "p*.jsonl")], root / "tok", progress=False, log=lambda *_: None)
    pieces = [[1] + [3 + b for b in d.encode()] + [2] for d in docs]
    stream = np.asarray([t for p in pieces for t in p], np.int32)
    doc = np.repeat(np.arange(len(pieces)), [len(p) for p in pieces])
    start = np.cumsum([0] + [len(p) for p in pieces])[:-1]
    return {"dir": str(root / "tok"), "stream": stream, "doc": doc, "start": start}


def _cfg(corpus, **text):
    return DataSection(kind="text", seq_len=L, seed=3, text=TextDataSection(train_tokens=corpus["dir"], **text))


def _take(ds_or_it, n):
    it = iter(ds_or_it)
    return [next(it) for _ in range(n)]


def _reference_window(corpus, w, boundaries=True):
    s, doc, start = corpus["stream"], corpus["doc"], corpus["start"]
    lo = w * L
    seg = np.zeros(L, np.int32)
    pos = np.zeros(L, np.int32)
    for i in range(L):  # numbered from 1 in order of appearance; position = offset from the document's start
        seg[i] = 1 if i == 0 else seg[i - 1] + (doc[lo + i] != doc[lo + i - 1])
        pos[i] = lo + i - start[doc[lo + i]]
    if not boundaries:
        seg, pos = np.ones(L, np.int32), np.arange(L, dtype=np.int32)
    return s[lo : lo + L], s[lo + 1 : lo + L + 1], seg, pos


@pytest.mark.parametrize("boundaries", [True, False])
def test_ordered_windows_match_reference(corpus, boundaries):
    n = (len(corpus["stream"]) - 1) // L
    ds = make_token_dataset(_cfg(corpus, shuffle=False, document_boundaries=boundaries), split="train", batch_size=4)
    batches = _take(ds, n // 4)
    chex.assert_shape(batches[0]["inputs"], (4, L))
    for b, batch in enumerate(batches):
        for r in range(4):
            inp, tgt, seg, pos = _reference_window(corpus, 4 * b + r, boundaries)
            np.testing.assert_array_equal(batch["inputs"][r], inp)
            np.testing.assert_array_equal(batch["targets"][r], tgt)
            np.testing.assert_array_equal(batch["segment_ids"][r], seg)
            np.testing.assert_array_equal(batch["positions"][r], pos)
    assert batches[0]["loss_mask"].dtype == np.float32 and batches[0]["loss_mask"].min() == 1.0
    assert batches[0]["inputs"].dtype == np.int32


def _rows(batch):
    return [tuple(r) for r in batch["inputs"]]


def test_global_shuffle_is_a_permutation_per_epoch(corpus):
    n = (len(corpus["stream"]) - 1) // L
    order = {tuple(_reference_window(corpus, w)[0]) for w in range(n)}
    ds = make_token_dataset(_cfg(corpus), split="train", batch_size=1)
    seen = [r for b in _take(ds, 2 * n) for r in _rows(b)]
    assert set(seen[:n]) == order and set(seen[n:]) == order and len(set(seen[:n])) == len(order)
    assert seen[:n] != seen[n:]  # reshuffled each epoch
    ordered = [tuple(_reference_window(corpus, w)[0]) for w in range(n)]
    assert seen[:n] != ordered
    again = [r for b in _take(make_token_dataset(_cfg(corpus), split="train", batch_size=1), n) for r in _rows(b)]
    assert again == seen[:n]  # deterministic


@pytest.mark.parametrize("pc", [2, 4])
def test_processes_read_disjoint_rows_of_the_same_global_batches(corpus, pc):
    ref = _take(make_token_dataset(_cfg(corpus), split="train", batch_size=8), 5)
    per = [
        _take(make_token_dataset(_cfg(corpus), split="train", batch_size=8 // pc, process_index=p, process_count=pc), 5)
        for p in range(pc)
    ]
    for s in range(5):
        for k in ref[s]:
            np.testing.assert_array_equal(np.concatenate([per[p][s][k] for p in range(pc)]), ref[s][k])


def test_exact_resume_with_other_process_count(corpus):
    full = _take(make_token_dataset(_cfg(corpus), split="train", batch_size=6), 12)
    its = [
        iter(make_token_dataset(_cfg(corpus), split="train", batch_size=3, process_index=p, process_count=2))
        for p in range(2)
    ]
    first = [[next(it) for it in its] for _ in range(5)]
    states = {json.dumps(it.get_state(), sort_keys=True) for it in its}
    assert len(states) == 1  # the same state on every host: valid for any process count
    state = json.loads(states.pop())
    resumed_its = [
        iter(make_token_dataset(_cfg(corpus), split="train", batch_size=2, process_index=p, process_count=3))
        for p in range(3)
    ]
    for it in resumed_its:
        it.set_state(state)
    rest = [[next(it) for it in resumed_its] for _ in range(7)]
    got = [np.concatenate([b["inputs"] for b in parts]) for parts in first + rest]
    for s in range(12):
        np.testing.assert_array_equal(got[s], full[s]["inputs"])


_KILL_SCRIPT = r"""
import json, os, sys
import numpy as np
from canon_jax.train.config import DataSection, TextDataSection
from canon_jax.train.text_stream import make_token_dataset

if __name__ == "__main__":
    d, out = sys.argv[1], sys.argv[2]
    cfg = DataSection(kind="text", seq_len=16, seed=3, num_workers=2, text=TextDataSection(train_tokens=d))
    it = iter(make_token_dataset(cfg, split="train", batch_size=4))
    for s in range(10 ** 6):
        b = next(it)
        np.save(os.path.join(out, f"batch{s}.npy"), b["inputs"])
        tmp = os.path.join(out, "state.tmp")
        with open(tmp, "w") as f:
            json.dump({"step": s + 1, "data": it.get_state()}, f)
        os.replace(tmp, os.path.join(out, "state.json"))  # the checkpoint: batches 0..step-1 done
"""


def test_kill9_mid_run_then_resume_with_two_processes(corpus, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.Popen(
        [sys.executable, str(script), corpus["dir"], str(tmp_path)], env=env, stderr=subprocess.PIPE
    )
    t0 = time.time()
    # batch31.npy is created only after the checkpoint of step 31 is in place (batch30.npy can appear just before it)
    while not (tmp_path / "batch31.npy").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - t0 < 120
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = json.loads((tmp_path / "state.json").read_text())
    k = saved["step"]
    assert k >= 31
    its = [
        iter(make_token_dataset(_cfg(corpus), split="train", batch_size=2, process_index=p, process_count=2))
        for p in range(2)
    ]
    for it in its:
        it.set_state(saved["data"])
    resumed = [np.concatenate([next(it)["inputs"] for it in its]) for _ in range(8)]
    stream = [np.load(tmp_path / f"batch{s}.npy") for s in range(k)] + resumed
    full = _take(make_token_dataset(_cfg(corpus), split="train", batch_size=4), k + 8)
    for s in range(k + 8):
        np.testing.assert_array_equal(stream[s], full[s]["inputs"])


def test_validation_split(corpus, tmp_path):
    n = (len(corpus["stream"]) - 1) // L
    cfg = _cfg(corpus, eval_fraction=0.25)
    n_eval = int(np.ceil(0.25 * n))
    ev = list(make_token_dataset(cfg, split="eval", batch_size=2))
    assert len(ev) == n_eval // 2  # one ordered pass, the partial batch dropped
    want = [tuple(_reference_window(corpus, w)[0]) for w in range(n - n_eval, n - n_eval + 2 * len(ev))]
    assert [r for b in ev for r in _rows(b)] == want
    train_rows = {r for b in _take(make_token_dataset(cfg, split="train", batch_size=1), n - n_eval) for r in _rows(b)}
    held = {tuple(_reference_window(corpus, w)[0]) for w in range(n - n_eval, n)}
    assert train_rows == {tuple(_reference_window(corpus, w)[0]) for w in range(n - n_eval)}
    assert not train_rows & held
    with pytest.raises(ValueError, match="no validation split"):
        make_token_dataset(_cfg(corpus), split="eval", batch_size=2)
    # an eval directory must come from the same tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": "a " * 200}) + "\n")
    tokenize_corpus([str(tmp_path / "e.jsonl")], tmp_path / "e", tok, progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="another tokenizer"):
        make_token_dataset(_cfg(corpus, eval_tokens=str(tmp_path / "e")), split="eval", batch_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_token_dataset(_cfg(corpus), split="train", batch_size=n + 1)


def test_memory_does_not_hold_the_corpus(corpus):
    ts = TokenShards(corpus["dir"])
    assert all(fd is None for fd in ts._fds)  # nothing read up front
    ds = make_token_dataset(_cfg(corpus), split="train", batch_size=2)
    _take(ds, 3)
    assert not any(isinstance(v, np.ndarray) and v.size >= len(corpus["stream"]) for v in vars(ts).values())


def test_trainer_streams_tokens_and_resumes(corpus, tmp_path):
    from canon_jax.train.config import ConfigError, config_from_dict
    from canon_jax.train.metrics import read_metrics
    from canon_jax.train.trainer import train
    from tests.train._util import tiny_config

    raw = tiny_config(
        {"train": "unused", "eval": "unused"},
        train={"steps": 4, "batch_size": 4},
        checkpoint={"every": 1},
        eval={"every": 2, "at_end": True},
    )
    raw["model"]["max_seq_len"] = L
    raw["data"] = {
        "kind": "text",
        "seq_len": L,
        "text": {"train_tokens": corpus["dir"], "eval_fraction": 0.2, "eval_batches": 2},
    }
    cfg = config_from_dict(raw)
    train(cfg, tmp_path / "full")
    part = train(config_from_dict(raw, ["train.stop_after=2"]), tmp_path / "part")
    assert part["step"] == 2
    resumed = train(cfg, tmp_path / "part")
    assert resumed["start_step"] == 2 and resumed["step"] == 4
    loss = {
        d: [r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("full", "part")
    }
    np.testing.assert_allclose(loss["part"][-2:], loss["full"][-2:], rtol=1e-6)
    evals = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r.get("eval") == "text"]
    assert [r["step"] for r in evals] == [2, 4] and all(np.isfinite(r["eval_loss"]) for r in evals)
    with pytest.raises(ConfigError, match="either train_tokens"):
        config_from_dict(raw, [f"data.text.train_files=[{corpus['dir']}]"])
    with pytest.raises(ConfigError, match="eval_fraction: must be in"):
        config_from_dict(raw, ["data.text.eval_fraction=1.5"])
    with pytest.raises(ConfigError, match="no validation split"):
        config_from_dict(raw, ["data.text.eval_fraction=0"])
    config_from_dict(raw, ["data.text.eval_fraction=0", "eval.at_end=false", "eval.every=0"])
