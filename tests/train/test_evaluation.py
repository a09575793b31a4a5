"""canon_jax.train.evaluation: the held-out loss sums against the NLL of the full logits, the eval
table's formatting, and that repeated evaluations reuse one compiled forward pass."""

import jax
import jax.numpy as jnp
import numpy as np

from canon_jax.config import ModelConfig
from canon_jax.models import CausalLM
from canon_jax.train.config import config_from_dict
from canon_jax.train.evaluation import eval_loss_sums, eval_table, flatten_metrics
from canon_jax.train.trainer import Trainer
from tests.train._util import tiny_config, write_corpus


def test_text_eval_sums_chunked_equal_full():
    cfg = ModelConfig(vocab_size=37, hidden_size=16, num_layers=1, num_heads=2, multiple_of=16)
    model = CausalLM(cfg)
    rng = np.random.default_rng(1)
    batch = {
        "inputs": jnp.asarray(rng.integers(0, 37, size=(2, 9)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, 37, size=(2, 9)), jnp.int32),
        "loss_mask": jnp.asarray(rng.random((2, 9)) > 0.3, jnp.int32),
    }
    params = model.init(jax.random.key(0), batch["inputs"])["params"]
    logits = model.apply({"params": params}, batch["inputs"])
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    ref = float(jnp.sum(nll * batch["loss_mask"]))
    for chunk in (0, 4):
        s, n = eval_loss_sums(model, params, batch, chunk)
        np.testing.assert_allclose(float(s), ref, rtol=1e-6, err_msg=str(chunk))
        assert float(n) == float(batch["loss_mask"].sum())


def test_eval_table_and_flatten():
    m = flatten_metrics({"acc": np.float32(0.5), "by_hop": {"1": 0.25, "count": 12}, "note": "x"})
    assert m == {"acc": 0.5, "by_hop/1": 0.25, "by_hop/count": 12.0, "note": "x"}
    rec = {"step": 4, "eval": "depo", **{f"depo/{k}": v for k, v in m.items()}, "eval_seconds": 1.0}
    assert eval_table({"depo": rec}).splitlines() == [
        "| eval | metric | value |",
        "|---|---|---|",
        "| depo | acc | 0.5000 |",
        "| depo | by_hop/1 | 0.2500 |",
        "| depo | by_hop/count | 12 |",
        "| depo | note | x |",
    ]


def test_logits_fn_compiles_once_across_evaluations(tmp_path):
    cfg = config_from_dict(tiny_config(write_corpus(tmp_path)))
    tr = Trainer(cfg)
    params = tr.init_state()["params"]
    tokens = np.ones((2, 16), np.int32)
    first = tr.logits_fn(params)(tokens)
    second = tr.logits_fn(jax.tree.map(lambda x: x * 2, params))(tokens)
    assert first.shape == second.shape == (2, 16, cfg.model.vocab_size) and first.dtype == np.float32
    assert tr._apply._cache_size() == 1
