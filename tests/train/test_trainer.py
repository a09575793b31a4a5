"""In-process trainer checks (1 CPU device): gradient accumulation, a step against a hand-written reference,
divergence diagnostics, corrupt-checkpoint fallback."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from canon_jax.losses import cross_entropy
from canon_jax.train.checkpoint import Checkpointer
from canon_jax.train.config import config_from_dict
from canon_jax.train.metrics import read_metrics
from canon_jax.train.text_data import make_text_dataset
from canon_jax.train.trainer import Trainer, TrainingDiverged, train
from tests.train._util import tiny_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _batch(cfg):
    it = iter(make_text_dataset(cfg.data, split="train", batch_size=cfg.train.batch_size))
    return next(it)


def test_step_matches_reference_and_accumulation(corpus):
    cfg = config_from_dict(tiny_config(corpus))
    tr = Trainer(cfg)
    batch = _batch(cfg)
    s0 = tr.init_state()
    params0 = jax.device_get(s0["params"])

    # Independent reference: full-batch loss and gradient, then optax's own clip + AdamW with the same lr.
    @jax.jit
    def ref_loss_grad(p):
        def loss_fn(p):
            logits = tr.model.apply({"params": p}, jnp.asarray(batch["inputs"]))
            return cross_entropy(
                logits, jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"]), z_loss="official"
            )[0]

        return jax.value_and_grad(loss_fn)(p)

    ref_loss, ref_g = ref_loss_grad(params0)
    ref_tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(tr.schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    )
    upd, _ = ref_tx.update(ref_g, ref_tx.init(params0), params0)
    s1, m1 = tr.step(s0, batch)
    np.testing.assert_allclose(float(m1["loss"]), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(optax.tree.norm(ref_g)), rtol=1e-5)
    np.testing.assert_allclose(float(m1["lr"]), 0.01, rtol=1e-6)
    assert int(s1["step"]) == 1
    # Adam normalises every coordinate, so float32 rounding in near-zero gradients can move a coordinate by a
    # visible fraction of lr; the update rule itself is checked to 2e-5 against float64 numpy in test_optimizer.
    delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), jax.device_get(s1["params"]), params0)
    chex.assert_trees_all_close(delta, jax.device_get(upd), rtol=0, atol=0.01 * 0.01)
    # Gradient accumulation over 4 micro-batches equals the full batch (same data, same init).
    cfg4 = config_from_dict(tiny_config(corpus, train={"grad_accum": 4}))
    tr4 = Trainer(cfg4)
    s4, m4 = tr4.step(tr.init_state(), batch)
    np.testing.assert_allclose(float(m4["loss"]), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    chex.assert_trees_all_close(jax.device_get(s4["params"]), jax.device_get(s1["params"]), rtol=0, atol=1e-4)


def _poisoned(at_batch: int):
    """A data factory whose ``at_batch``-th batch carries a token id outside the vocabulary: the embedding gather
    fills it with NaN (jnp.take's out-of-bounds mode), so that step's loss and gradients are NaN."""
    from canon_jax.train.trainer import make_train_data

    def factory(cfg, **kw):
        ds = make_train_data(cfg, **kw)

        class It:
            def __init__(self):
                self.it, self.n = iter(ds), 0

            def __next__(self):
                b = dict(next(self.it))
                self.n += 1
                if self.n == at_batch:
                    b["inputs"] = b["inputs"].copy()
                    b["inputs"][0, 5] = 10_000
                return b

            def get_state(self):
                return self.it.get_state()

            def set_state(self, s):
                self.it.set_state(s)

        class Ds:
            def __iter__(self):
                return It()

        return Ds()

    return factory


def test_nonfinite_stops_without_overwriting_checkpoint(corpus, tmp_path):
    cfg = config_from_dict(tiny_config(corpus, checkpoint={"every": 1}))
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, tmp_path, data_factory=_poisoned(3))
    msg = str(e.value)
    assert msg.startswith("non-finite training at step 3: loss=nan, grad_norm=nan"), msg
    assert "['embed']['embedding']" in msg  # names the offending parameters
    assert Checkpointer(tmp_path / "checkpoints", 1, 5).all_steps() == [1, 2]  # the NaN state was never saved


def test_nonfinite_between_log_steps_names_the_first_bad_step(corpus, tmp_path):
    # The metrics are fetched every 4 steps only: the NaN of step 3 is found at step 4, reported as step 3, with no
    # record or checkpoint written for a non-finite state.
    cfg = config_from_dict(tiny_config(corpus, train={"log_every": 4}, checkpoint={"every": 4}))
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, tmp_path, data_factory=_poisoned(3))
    msg = str(e.value)
    assert msg.startswith("non-finite training at step 3: loss=nan, grad_norm=nan"), msg
    assert "['embed']['embedding']" in msg
    assert not (tmp_path / "checkpoints").exists() or Checkpointer(tmp_path / "checkpoints", 4, 5).all_steps() == []
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == []


def test_corrupt_latest_checkpoint_falls_back(corpus, tmp_path):
    cfg = config_from_dict(tiny_config(corpus))
    tr = Trainer(cfg)
    state = tr.init_state()
    root, tmp_path = tmp_path, tmp_path / "ck"
    ck = Checkpointer(tmp_path, every=1, keep=5, async_save=False)
    batch = _batch(cfg)
    ck.save(1, state, {"k": 1}, {"c": 1}, force=True)
    state2, _ = tr.step(state, batch)
    state2_host = jax.device_get(state2)
    ck.save(2, state2, {"k": 2}, {"c": 2}, force=True)
    ck.wait()
    restored = ck.restore(tr.restore_target())
    assert restored[0] == 2 and restored[2] == {"k": 2}
    chex.assert_trees_all_close(jax.device_get(restored[1]["params"]), state2_host["params"])
    # damage step 2: truncate every array file of its state item
    for f in (tmp_path / "2" / "state").rglob("*"):
        if f.is_file() and f.name not in ("_CHECKPOINT_METADATA",):
            f.write_bytes(b"")
    ck2 = Checkpointer(tmp_path, every=1, keep=5)
    restored = ck2.restore(tr.restore_target())
    assert restored[0] == 1 and restored[2] == {"k": 1}
    # the damaged step is moved aside, not deleted, and no longer counts as a checkpoint
    assert [d.step for d in ck2.damaged] == [2] and ck2.damaged[0].moved_to == root / "damaged_ck" / "2"
    assert (root / "damaged_ck" / "2" / "state").is_dir() and ck2.all_steps() == [1]
    ck2.close()
