"""Evaluation during and at the end of a run: the exact task evaluators (:func:`canon_jax.eval.evaluate`) for
synthetic-task runs, the held-out token loss for text runs, and the tables printed for them.

Every evaluation writes one ``metrics.jsonl`` record per task (``{"step", "eval", "<task>/<metric>", ...,
"eval_seconds"}``; text runs: ``{"step", "eval": "text", "eval_loss"}``) and prints a table.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from canon_jax.train.config import ExperimentConfig
from canon_jax.train.inputs import data_config
from canon_jax.train.metrics import MetricsLogger
from canon_jax.train.step import model_loss

__all__ = ["Evaluator", "eval_loss_sums", "eval_table", "flatten_metrics"]


def eval_loss_sums(model, params, batch, chunk_size: int):
    """``(sum of the token NLLs, number of loss tokens)`` of one batch (no z-loss term)."""
    _, aux = model_loss(model, params, batch, batch["loss_mask"].astype(jnp.float32), chunk_size)
    return aux["nll"] * aux["num_tokens"], aux["num_tokens"]


class Evaluator:
    """The configured evaluations of a run; its jitted functions are built once and reused at every evaluation.

    Args:
      trainer: the run's :class:`~canon_jax.train.trainer.Trainer` (model, mesh, ``logits_fn``, ``generate_fn``).
      cfg: the experiment config (``eval`` section; the data mix names the tasks and their token ids).
      data_factory: builds the held-out split for text runs (the trainer's ``data_factory``).
      local_batch_size, process_index, process_count: this process's share of a global batch.
    """

    def __init__(
        self,
        trainer,
        cfg: ExperimentConfig,
        data_factory,
        local_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.trainer, self.cfg = trainer, cfg
        self._data_factory = data_factory
        self._shard = {"batch_size": local_batch_size, "process_index": process_index, "process_count": process_count}
        if cfg.data.kind == "text":
            chunk = cfg.train.loss_chunk_size
            self._loss_sums = jax.jit(lambda p, b: eval_loss_sums(trainer.model, p, b, chunk))
        else:
            self._vocab = data_config(cfg)  # token ids of the training mix

    def __call__(self, params, step: int, logger: MetricsLogger) -> dict:
        """Run the evaluations on ``params``; log one record per task and print the table. Returns the records by
        task name."""
        if self.cfg.data.kind == "text":
            loss = self.text_loss(params)
            rec = {"step": step, "eval": "text", "eval_loss": loss}
            logger.log(rec, prefix="eval")
            logger.write(f"evaluation at step {step}: held-out loss {loss:.4f}")
            return {"text": rec}
        from canon_jax.eval import evaluate

        cfg, trainer = self.cfg, self.trainer
        logits_fn = trainer.logits_fn(params)
        results = {}
        for t in cfg.eval.tasks or cfg.data.tasks:
            t0 = time.perf_counter()
            # Lano's generation accuracy samples at temperature 1 (as in the paper); the other tasks are greedy.
            generate_fn = trainer.generate_fn(params, temperature=1.0 if t.name == "lano" else 0.0)
            extra = {"num_params": trainer.n_params} if t.name == "capo" else {}
            m = evaluate(
                t.name,
                dict(t.params),
                logits_fn=logits_fn,
                generate_fn=generate_fn,
                vocab=self._vocab,
                num_samples=cfg.eval.num_samples,
                batch_size=cfg.eval.batch_size,
                seed=cfg.eval.seed,
                **extra,
            )
            rec = {
                "step": step,
                "eval": t.name,
                **{f"{t.name}/{k}": v for k, v in flatten_metrics(m).items()},
                "eval_seconds": time.perf_counter() - t0,
            }
            logger.log(rec, prefix="eval")
            results[t.name] = rec
        logger.write(f"evaluation at step {step}:\n{eval_table(results)}")
        return results

    def text_loss(self, params) -> float:
        """Mean token loss over ``data.text.eval_batches`` batches of the held-out files."""
        ds = self._data_factory(self.cfg, split="eval", **self._shard)
        tot, n = 0.0, 0.0
        for i, batch in enumerate(ds):
            if i >= self.cfg.data.text.eval_batches:
                break
            with self.trainer.context():
                s, c = self._loss_sums(params, self.trainer.global_batch(batch))
            tot, n = tot + float(s), n + float(c)
        return tot / max(n, 1.0)


def flatten_metrics(d: dict, prefix: str = "") -> dict:
    """Nested evaluator metrics -> ``{"a/b": value}`` with scalars as floats and anything else as JSON-able values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key + "/"))
        elif isinstance(v, (int, float, np.number, np.ndarray, jax.Array)) and np.ndim(v) == 0:
            out[key] = float(v)
        else:
            out[key] = v if isinstance(v, (str, bool, list)) else str(v)
    return out


def eval_table(results: dict) -> str:
    """Markdown table ``| eval | metric | value |`` of evaluation records (counts as integers, the rest to 4 d.p.)."""
    lines = ["| eval | metric | value |", "|---|---|---|"]
    for name, rec in results.items():
        for k, v in rec.items():
            if k in ("step", "eval", "eval_seconds"):
                continue
            val = (
                (str(int(v)) if float(v).is_integer() and "count" in k else f"{v:.4f}")
                if isinstance(v, float)
                else str(v)
            )
            lines.append(f"| {name} | {k.split('/', 1)[-1]} | {val} |")
    return "\n".join(lines)
