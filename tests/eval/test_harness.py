"""Benchmark scoring (canon_jax.eval.harness) vs a float64 numpy LlamaCanon on the official tiny checkpoint, batching
consistency for every architecture, generation, and the lm-evaluation-harness model ``canon-jax``."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from canon_jax.config import ModelConfig
from canon_jax.eval.harness import CanonLM, rolling_windows
from canon_jax.models import CausalLM
from tests.models import np_llama
from tests.models.helpers import random_params

CHARS = [chr(c) for c in range(32, 126)]  # 94 characters + 3 specials = the tiny checkpoint's 97 ids


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{c: 3 + i for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    tok.decoder = decoders.Fuse()
    return tok


def ids(text):
    return [3 + CHARS.index(c) for c in text]


@pytest.fixture(scope="module")
def official(refs_dir, tmp_path_factory):
    src = refs_dir / "llama_canon" / "canon_abcd"
    d = tmp_path_factory.mktemp("hf")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, d / f)
    char_tokenizer().save(str(d / "tokenizer.json"))
    hf_cfg = json.loads((d / "config.json").read_text())
    return {"dir": d, "cfg": hf_cfg, "sd": load_file(str(d / "model.safetensors"))}


def ref_logprobs(official, seq):
    """float64 log p(seq[t+1] | seq[:t+1]) for every t."""
    logits = np_llama.forward(official["cfg"], official["sd"], np.asarray([seq[:-1]]))[0]
    z = logits.max(-1, keepdims=True)
    logp = logits - (np.log(np.exp(logits - z).sum(-1, keepdims=True)) + z)
    return logp[np.arange(len(seq) - 1), seq[1:]], logits.argmax(-1) == np.asarray(seq[1:])


REQUESTS = [
    ("The cat", " sat on the mat."),
    ("Q: 2+2=", " 4"),
    ("", "hello"),
    ("abc  ", "def"),
    ("A long context that goes on for a while, " * 2, " end"),
    ("x", "y"),
]


def test_loglikelihood_matches_float64_reference(official):
    lm = CanonLM.from_hf_dir(official["dir"], batch_size=4)
    got = lm.loglikelihood(REQUESTS)
    for (ctx, cont), (lp, greedy) in zip(REQUESTS, got):
        if not ctx:
            c, x = [1], ids(cont)
        else:
            c, x = ids(ctx.rstrip()), ids(ctx[len(ctx.rstrip()) :] + cont)
        seq = c + x
        ref, ref_greedy = ref_logprobs(official, seq)
        assert abs(lp - ref[-len(x) :].sum()) < 1e-4, (ctx, cont)
        assert greedy == bool(ref_greedy[-len(x) :].all())


def test_rolling_loglikelihood(official):
    text = "the quick brown fox jumps over the lazy dog"
    lm = CanonLM.from_hf_dir(official["dir"], batch_size=3)
    ref, _ = ref_logprobs(official, [1] + ids(text))
    assert abs(lm.rolling_loglikelihood_tokens([ids(text)])[0] - ref.sum()) < 1e-4
    # windows of 8: every token predicted once, each from the longest context that fits in 8 inputs
    small = CanonLM.from_hf_dir(official["dir"], batch_size=3, max_length=8)
    wins = rolling_windows(ids(text), 1, 8)
    assert [t for _, c in wins for t in c] == ids(text)
    want = 0.0
    for ctx, cont in wins:
        seq = ctx + cont
        assert len(seq) - 1 <= 8 and (len(seq) - 1 == 8 or ctx[0] == 1)
        want += ref_logprobs(official, seq)[0][-len(cont) :].sum()
    assert abs(small.rolling_loglikelihood_tokens([ids(text)])[0] - want) < 1e-4


def test_generate_until_matches_reference_greedy(official):
    lm = CanonLM.from_hf_dir(official["dir"], batch_size=2)
    prompts = ["Once upon a time", "ab", "The answer is"]
    out = lm.generate_until(prompts, until=[], max_gen_toks=6)
    for p, text in zip(prompts, out):
        seq = ids(p)
        for _ in range(6):  # greedy decoding with a full float64 forward per step
            logits = np_llama.forward(official["cfg"], official["sd"], np.asarray([seq]))[0, -1]
            seq.append(int(logits.argmax()))
        new = [t for t in seq[len(ids(p)) :]]
        want = "".join(CHARS[t - 3] if t >= 3 else "" for t in (new[: new.index(2)] if 2 in new else new))
        assert text == want
        stop = want[2:4]
        if stop and want.find(stop) == 2:
            assert lm.generate_until([p], until=[stop], max_gen_toks=6)[0] == want[:2]


ARCHS = {
    "llama": dict(arch="llama", canon_set="ABCD"),
    "gla": dict(arch="gla", canon_set="AbCD"),
    "mamba2": dict(arch="mamba2", canon_set="AbCD"),
    "gdn": dict(arch="gdn", canon_set="AbCD"),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_batches_consistently(arch):
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=1, num_heads=2, max_seq_len=32, **ARCHS[arch])
    model = CausalLM(cfg)
    params = random_params(model, 0, scale=0.2)
    lm = CanonLM(model, params, char_tokenizer(), batch_size=3)
    # 12 tokens each (one reference compilation), split differently; the batch pads them to 16 and mixes splits
    reqs = [
        (ids("hello"), ids(" world!")),
        (ids("a"), ids("bcdefghijkl")),
        (ids("longer cont"), ids("!")),
        ([1], ids("xyz and mor")),
    ]
    got = lm.loglikelihood_tokens(reqs)
    apply = jax.jit(model.apply)
    for (c, x), (lp, greedy) in zip(reqs, got):
        seq = np.asarray([c + x])  # alone, unpadded, float32
        logits = np.asarray(apply({"params": params}, jnp.asarray(seq[:, :-1])), np.float64)[0]
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        t = seq[0, 1:]
        want = logp[np.arange(len(t)), t][-len(x) :].sum()
        assert abs(lp - want) < 1e-4
        assert greedy == bool((logits.argmax(-1) == t)[-len(x) :].all())
    prompts = ["hi", "a longer prompt", "xyz"]
    batched = lm.generate_until(prompts, max_gen_toks=3)
    single = CanonLM(model, params, char_tokenizer(), batch_size=1).generate_until(prompts, max_gen_toks=3)
    assert batched == single and all(isinstance(t, str) for t in batched)


def test_bad_requests(official):
    lm = CanonLM.from_hf_dir(official["dir"], max_length=16)
    with pytest.raises(ValueError, match="empty continuation"):
        lm.loglikelihood_tokens([(ids("a"), [])])
    with pytest.raises(ValueError, match="exceeds max_length"):
        lm.loglikelihood_tokens([(ids("a"), ids("x" * 17))])
    with pytest.raises(ValueError, match="max_gen_toks"):
        lm.generate_until(["a"], max_gen_toks=16)
    with pytest.raises(ValueError, match="max_length must be in"):
        CanonLM.from_hf_dir(official["dir"], max_length=10**6)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        CanonLM.from_hf_dir(pathlib.Path(official["dir"]).parent / "missing")


# ----------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness

TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""

MC = [
    {"question": "The cat sat on the", "choices": ["mat", "sky", "42"], "answer": 0},
    {"question": "1 2 3 4", "choices": ["5", "z", "!"], "answer": 0},
    {"question": "hello", "choices": ["world", "there", "!"], "answer": 1},
    {"question": "abc", "choices": ["d", "x"], "answer": 0},
]


def test_lm_eval_multiple_choice_task(official, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from canon_jax.eval.lm_eval_model import CanonJaxLM

    assert get_model("canon-jax") is CanonJaxLM
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    lm = CanonJaxLM.create_from_arg_string(f"hf_dir={official['dir']},batch_size=4")
    res = lm_eval.simple_evaluate(
        model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True
    )
    # expected accuracy from the float64 reference: the choice (after the task's " " delimiter) with the highest
    # log-likelihood
    correct = []
    for row in MC:
        scores = [
            ref_logprobs(official, ids(row["question"]) + ids(" " + ch))[0][-len(ch) - 1 :].sum()
            for ch in row["choices"]
        ]
        correct.append(int(np.argmax(scores)) == row["answer"])
    assert res["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))
    samples = res["samples"]["tiny_mc"]
    assert len(samples) == len(MC)
    for s in samples:  # per-example log-likelihoods of the exact requests lm_eval made
        for (ctx, cont), resp in zip(s["arguments"], s["resps"]):
            lp = resp[0][0]  # one (logprob, is_greedy) response per request
            want = ref_logprobs(official, ids(ctx) + ids(cont))[0][-len(cont) :].sum()
            assert abs(float(lp) - want) < 1e-4
    with pytest.raises(ValueError, match="exactly one of"):
        CanonJaxLM.create_from_arg_string("batch_size=2")


def test_from_workdir_scores_with_the_checkpointed_params(tmp_path):
    from canon_jax.train.config import config_from_dict
    from canon_jax.train.text_data import byte_level_tokenizer
    from canon_jax.train.trainer import train
    from tests.train._util import tiny_config, write_corpus

    raw = tiny_config(
        write_corpus(tmp_path / "corpus", docs=40), train={"steps": 2, "batch_size": 2}, checkpoint={"every": 1}
    )
    raw["model"]["max_seq_len"] = raw["data"]["seq_len"] = 32
    summary = train(config_from_dict(raw), tmp_path / "run")
    lm = CanonLM.from_workdir(tmp_path / "run", batch_size=2)
    assert lm.bos_id == 1 and lm.eos_id == 2 and lm.max_length == 32
    tok = byte_level_tokenizer()
    c, x = tok.encode("the cat", add_special_tokens=False).ids, tok.encode(" sat", add_special_tokens=False).ids
    ((lp, _),) = lm.loglikelihood_tokens([(c, x)])
    params = jax.device_get(summary["state"]["params"])
    logits = np.asarray(lm.model.apply({"params": params}, jnp.asarray([c + x[:-1]])), np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = logp[np.arange(len(c) - 1, len(c) + len(x) - 1), x].sum()
    assert abs(lp - want) < 1e-4
    first = CanonLM.from_workdir(tmp_path / "run", step=1)
    assert not np.allclose(np.asarray(jax.tree.leaves(first.params)[0]), np.asarray(jax.tree.leaves(lm.params)[0]))
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
        CanonLM.from_workdir(tmp_path / "run", step=7)
