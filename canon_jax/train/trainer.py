"""The training loop: sharded train state, jit-compiled step, checkpoint-resume, evaluation, logging.

``train(cfg, workdir)`` is the whole run; the pieces (``build_train_step``, ``init_state``, ...) are public so tests
and benchmarks can drive single steps.

Train state: ``{"step": int32 [], "params": pytree, "opt_state": optax state}``; float32 params and optimizer moments,
compute in ``model.dtype`` (bf16 on accelerators). Every array is laid out by the logical-axis rules of
:mod:`canon_jax.train.sharding` on a ``(data, fsdp, tensor)`` mesh; batches are split over ``(data, fsdp)``, each
process reading only its own slice of the global batch.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from canon_jax.train import sharding as shd
from canon_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from canon_jax.train.config import ConfigError, ExperimentConfig, config_to_dict, model_config
from canon_jax.train.flops import count_params, flops_per_token, peak_flops_per_device
from canon_jax.train.metrics import MetricsLogger
from canon_jax.train.optimizer import make_optimizer

__all__ = ["train", "TrainingDiverged", "Trainer", "build_train_step", "make_model", "make_train_data"]

log = logging.getLogger(__name__)

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class TrainingDiverged(RuntimeError):
    """Raised when the loss or gradient norm stops being finite; the message holds the diagnostic."""


# ----------------------------------------------------------------------------------------------------------------------
# Model, data
def make_model(mc):
    from canon_jax.models import CausalLM

    return CausalLM(mc)


def _data_config(cfg: ExperimentConfig):
    """Map the ``data`` section onto ``canon_jax.data.DataConfig`` (only the fields it defines)."""
    from canon_jax.data import DataConfig

    d = cfg.data
    names = {f.name for f in dataclasses.fields(DataConfig)}
    values = {
        "tasks": [{"name": t.name, "weight": t.weight, "params": dict(t.params)} for t in d.tasks],
        "seq_len": d.seq_len, "loss_on": d.loss_on, "seed": d.seed, "num_workers": d.num_workers,
        "shuffle_buffer": d.shuffle_buffer, "split_long": d.split_long,
    }
    try:
        return DataConfig(**{k: v for k, v in values.items() if k in names})
    except (ValueError, TypeError) as e:  # unknown task / parameter: name the config key
        raise ConfigError(f"data.tasks: {str(e).splitlines()[0]}") from None


def make_train_data(cfg: ExperimentConfig, *, split: str, batch_size: int, process_index: int, process_count: int):
    """The grain dataset of this process's share of every global batch (dict of numpy arrays, COMMON.md format)."""
    if cfg.data.kind == "text":
        from canon_jax.train.text_data import make_text_dataset

        return make_text_dataset(cfg.data, split=split, batch_size=batch_size, process_index=process_index,
                                 process_count=process_count)
    from canon_jax.data import make_dataset

    return make_dataset(_data_config(cfg), split=split, batch_size=batch_size, process_index=process_index,
                        process_count=process_count)


def data_vocab_size(cfg: ExperimentConfig) -> Optional[int]:
    """Vocabulary the data needs (None when unknown)."""
    if cfg.data.kind == "text":
        from canon_jax.train.text_data import load_tokenizer

        return load_tokenizer(cfg.data.text.tokenizer).get_vocab_size()
    return _data_config(cfg).vocab_size()


# ----------------------------------------------------------------------------------------------------------------------
# Train step
def _loss_terms(model, cfg: ExperimentConfig, params, batch, total_tokens):
    """Loss of one (micro-)batch, weighted so micro-batch terms sum to the full batch's token mean."""
    from canon_jax.losses import cross_entropy

    kwargs = {}
    if model.config.segment_aware:
        # Official recipe (SPEC 0.9): plain causal attention and window positions across packed documents; the
        # document structure is only used when segment-aware masking is switched on.
        kwargs = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}
    logits = model.apply({"params": params}, batch["inputs"], **kwargs)
    mask = batch["loss_mask"].astype(jnp.float32)
    loss, aux = cross_entropy(logits, batch["targets"], mask, z_loss=cfg.optim.z_loss,
                              z_loss_weight=cfg.optim.z_loss_weight)
    # cross_entropy is a masked mean (0 for an all-masked micro-batch); re-weight by this micro-batch's share.
    w = mask.sum() / total_tokens
    return loss * w, aux["nll"] * w


def build_train_step(model, cfg: ExperimentConfig, tx, schedule, mesh=None):
    """``step(state, batch) -> (state, metrics)`` (not jitted). ``metrics``: loss, grad_norm, lr, tokens,
    nonfinite (tree of per-parameter flags: gradient leaf has a non-finite entry)."""
    accum = cfg.train.grad_accum

    def step_fn(state, batch):
        params = state["params"]
        total = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
        grad_fn = jax.value_and_grad(lambda p, b: _loss_terms(model, cfg, p, b, total), has_aux=True)
        if accum == 1:
            (loss, nll), grads = grad_fn(params, batch)
        else:
            def split(x):  # [B, ...] -> [accum, B/accum, ...] keeping each device's rows on the device
                x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
                if mesh is not None:
                    x = jax.lax.with_sharding_constraint(
                        x, NamedSharding(mesh, P(None, ("data", "fsdp"), *([None] * (x.ndim - 2)))))
                return x

            micro = jax.tree.map(split, batch)

            def body(carry, mb):
                (l, n), g = grad_fn(params, mb)
                return (carry[0] + l, carry[1] + n, jax.tree.map(jnp.add, carry[2], g)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            zero = jnp.zeros((), jnp.float32)
            (loss, nll, grads), _ = jax.lax.scan(body, (zero, zero, zeros), micro)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics = {"loss": loss, "nll": nll, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "tokens": batch["loss_mask"].astype(jnp.float32).sum(),
                   "nonfinite": jax.tree.map(lambda g: ~jnp.all(jnp.isfinite(g)), grads)}
        return new_state, metrics

    if mesh is None:
        return step_fn

    def step_in_mesh(state, batch):
        # The mesh and the logical rules at trace time, whoever jits or lowers the step: the model's sharding
        # annotations and the kernels' shard_map (canon_jax.ops.sharded) read them, and the kernels pick their
        # implementation from the mesh's devices.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
            return step_fn(state, batch)

    return step_in_mesh


# ----------------------------------------------------------------------------------------------------------------------
class Trainer:
    """Everything a run needs, built from a validated config (model, mesh, optimizer, shardings, jitted step).

    Args:
      cfg: the experiment config.
      devices: devices of the mesh (default: all).
      model_factory: ``ModelConfig -> Linen module`` (default ``CausalLM``).
    """

    def __init__(self, cfg: ExperimentConfig, devices=None, model_factory: Callable = make_model):
        self.cfg = cfg
        self.model_config = model_config(cfg)
        self.model = model_factory(self.model_config)
        self.mesh = shd.make_mesh(cfg.mesh, devices)
        self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.steps)
        self.seq_len = cfg.data.seq_len
        dummy = jnp.zeros((1, self.seq_len), jnp.int32)

        def init_boxed(rng):
            params = self.model.init(rng, dummy)["params"]
            return params

        key = jax.random.key(0)
        with self.context():  # traced for the mesh's platform (the model may pick kernels from it)
            boxed = jax.eval_shape(init_boxed, key)
        param_sh = shd.logical_shardings(boxed, self.mesh)
        abstract_params = nn.meta.unbox(boxed)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        replicated = NamedSharding(self.mesh, P())
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, param_sh,
                                       transform_non_params=lambda _: replicated)
        self.state_shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh}
        self.abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
                               "opt_state": abstract_opt}
        self.n_params = count_params(abstract_params)
        self.batch_sharding = shd.batch_sharding(self.mesh)

        def init_state(rng):
            params = nn.meta.unbox(init_boxed(rng))
            return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

        with self.context():
            self._init = jax.jit(init_state, out_shardings=self.state_shardings)
        step_fn = build_train_step(self.model, cfg, self.tx, self.schedule, self.mesh)
        batch_sh = {k: self.batch_sharding for k in BATCH_KEYS}
        self._step = jax.jit(step_fn, in_shardings=(self.state_shardings, batch_sh),
                             out_shardings=(self.state_shardings, None), donate_argnums=0)

    # ----------------------------------------------------------------------------------------------------------------
    def context(self):
        """Mesh + logical-axis rules for tracing (activates the model's ``with_logical_constraint`` annotations)."""
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(shd.LOGICAL_RULES))
        return stack

    def init_state(self, seed: Optional[int] = None):
        with self.context():
            return self._init(jax.random.key(self.cfg.train.seed if seed is None else seed))

    def restore_target(self):
        return abstract_with_shardings(self.abstract_state, self.state_shardings)

    def global_batch(self, local: dict) -> dict:
        """Assemble this process's rows into global arrays sharded over (data, fsdp)."""
        gb = self.cfg.train.batch_size
        out = {}
        for k in BATCH_KEYS:
            x = np.asarray(local[k])
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding, x, (gb,) + x.shape[1:])
        return out

    def step(self, state, batch: dict):
        """One optimizer step on a global batch (dict of numpy or global arrays)."""
        if not isinstance(batch["inputs"], jax.Array):
            batch = self.global_batch(batch)
        with self.context():
            return self._step(state, {k: batch[k] for k in BATCH_KEYS})

    # ----------------------------------------------------------------------------------------------------------------
    def logits_fn(self, params):
        """Teacher-forced scoring for the evaluators: ``tokens [B, L] int -> logits [B, L, V] float32`` (numpy)."""
        apply = jax.jit(lambda p, t: self.model.apply({"params": p}, t))

        def fn(tokens):
            with self.context():
                return np.asarray(apply(params, jnp.asarray(tokens, jnp.int32)))

        return fn

    def generate_fn(self, params, temperature: float = 0.0):
        """Generation for the evaluators: ``(prompts [B,P], prompt_mask [B,P], max_new_tokens, rng) -> [B,N]``."""
        from canon_jax.generate import generate

        def fn(prompts, prompt_mask, max_new_tokens, rng=None):
            if rng is not None and not isinstance(rng, jax.Array):
                rng = jax.random.key(int(np.asarray(rng).ravel()[0]) if np.ndim(rng) else int(rng))
            with self.context():
                out = generate(self.model, params, jnp.asarray(prompts, jnp.int32), int(max_new_tokens),
                               temperature=temperature, rng=rng, prompt_mask=jnp.asarray(prompt_mask, bool))
            return np.asarray(out)

        return fn


# ----------------------------------------------------------------------------------------------------------------------
def _nonfinite_report(step, loss, grad_norm, flags) -> str:
    bad = [jax.tree_util.keystr(path) for path, v in jax.tree_util.tree_leaves_with_path(flags) if bool(v)]
    shown = ", ".join(bad[:10]) + (f" ... (+{len(bad) - 10} more)" if len(bad) > 10 else "")
    return (f"non-finite training at step {step}: loss={loss}, grad_norm={grad_norm}; parameters with non-finite "
            f"gradients: {shown or 'none (the loss itself overflowed)'}. The run stopped without saving; the last "
            f"good checkpoint is kept.")


class _Preemption:
    """SIGTERM handler: records the request; the loop saves at the current step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _evaluate(trainer: Trainer, params, cfg: ExperimentConfig, step: int, logger: MetricsLogger, eval_iter_fn):
    """Run the configured evaluations; log one record per task (and the validation loss for text runs)."""
    results = {}
    if cfg.data.kind == "text":
        loss = eval_iter_fn(params)
        rec = {"step": step, "eval": "text", "eval_loss": loss}
        logger.log(rec, prefix="eval")
        results["text"] = rec
        return results
    from canon_jax.eval import evaluate

    logits_fn = trainer.logits_fn(params)
    vocab = _data_config(cfg)  # token ids of the training mix
    for t in (cfg.eval.tasks or cfg.data.tasks):
        t0 = time.perf_counter()
        # Lano's generation accuracy samples at temperature 1 (SPEC 0.6); the other generation tasks are greedy.
        generate_fn = trainer.generate_fn(params, temperature=1.0 if t.name == "lano" else 0.0)
        extra = {"num_params": trainer.n_params} if t.name == "capo" else {}
        m = evaluate(t.name, dict(t.params), logits_fn=logits_fn, generate_fn=generate_fn, vocab=vocab,
                     num_samples=cfg.eval.num_samples, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, **extra)
        rec = {"step": step, "eval": t.name, **{f"{t.name}/{k}": v for k, v in _flatten(m).items()},
               "eval_seconds": time.perf_counter() - t0}
        logger.log(rec, prefix="eval")
        results[t.name] = rec
    return results


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float, np.number, np.ndarray, jax.Array)) and np.ndim(v) == 0:
            out[key] = float(v)
        else:
            out[key] = v if isinstance(v, (str, bool, list)) else str(v)
    return out


def _eval_table(results: dict) -> str:
    lines = ["| eval | metric | value |", "|---|---|---|"]
    for name, rec in results.items():
        for k, v in rec.items():
            if k in ("step", "eval", "eval_seconds"):
                continue
            val = (str(int(v)) if float(v).is_integer() and "count" in k else f"{v:.4f}") if isinstance(v, float) \
                else str(v)
            lines.append(f"| {name} | {k.split('/', 1)[-1]} | {val} |")
    return "\n".join(lines)


def train(cfg: ExperimentConfig, workdir, *, devices=None, model_factory: Callable = make_model,
          data_factory: Callable = make_train_data) -> dict:
    """Train (or resume) the run described by ``cfg`` in ``workdir``; returns a summary dict.

    Resumes from the newest readable checkpoint in ``workdir/checkpoints``. Writes ``metrics.jsonl``, TensorBoard
    events, ``config.json``. SIGTERM saves a checkpoint at the current step and returns (``summary["preempted"]``).
    Raises :class:`TrainingDiverged` on a non-finite loss/grad-norm (no checkpoint is written for that state).
    """
    shd.maybe_initialize_distributed(cfg.mesh)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mc = model_config(cfg)
    need = data_vocab_size(cfg)
    if need is not None and need > mc.vocab_size:
        raise ConfigError(f"model.vocab_size: {mc.vocab_size} is smaller than the data's vocabulary ({need}); "
                          f"set model.vocab_size >= {need}")
    pc, pi = jax.process_count(), jax.process_index()
    if cfg.train.batch_size % pc:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by the {pc} processes")
    trainer = Trainer(cfg, devices=devices, model_factory=model_factory)
    dp = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
    if cfg.train.batch_size % dp or (cfg.train.batch_size // cfg.train.grad_accum) % dp:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} (/ grad_accum {cfg.train.grad_accum}) must be "
                          f"divisible by the data-parallel size data*fsdp = {dp}")
    local_bs = cfg.train.batch_size // pc
    dataset = data_factory(cfg, split="train", batch_size=local_bs, process_index=pi, process_count=pc)
    it = iter(dataset)
    cfg_dict = config_to_dict(cfg)
    if pi == 0:
        (workdir / "config.json").write_text(json.dumps(cfg_dict, indent=2))

    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint.every, cfg.checkpoint.keep,
                        cfg.checkpoint.async_save) if cfg.checkpoint.enabled else None
    restored = ckpt.restore(trainer.restore_target()) if ckpt is not None else None
    if restored is not None:
        start, state, data_state = restored
        it.set_state(data_state)
        log.info("resumed from step %d", start)
    else:
        start, state = 0, trainer.init_state()
    total = cfg.train.steps
    stop = cfg.train.stop_after or total
    logger = MetricsLogger(workdir, total, start_step=start, tensorboard=cfg.logging.tensorboard,
                           progress=cfg.logging.progress)
    if restored is not None:
        logger.write(f"resumed from checkpoint at step {start}")
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    fpt = flops_per_token(mc, trainer.n_params, cfg.data.seq_len)
    peak = cfg.train.peak_flops_per_device or peak_flops_per_device()
    n_dev = trainer.mesh.size

    eval_iter_fn = None
    if cfg.data.kind == "text":
        eval_iter_fn = functools.partial(_text_eval_loss, trainer, cfg, data_factory, local_bs, pi, pc)

    summary = {"start_step": start, "preempted": False, "n_params": trainer.n_params, "workdir": str(workdir)}
    last_eval = {}
    step = start
    window_t0, window_steps, last_loss = time.perf_counter(), 0, None
    try:
        with _Preemption() as pre:
            while step < stop:
                batch = next(it)
                state, m = trainer.step(state, batch)
                step += 1
                window_steps += 1
                loss, gnorm = float(m["loss"]), float(m["grad_norm"])
                if not (math.isfinite(loss) and math.isfinite(gnorm)):
                    raise TrainingDiverged(_nonfinite_report(step, loss, gnorm, jax.device_get(m["nonfinite"])))
                last_loss = loss
                if step == start + 1:  # exclude compilation from the throughput window
                    window_t0, window_steps = time.perf_counter(), 0
                if step % cfg.train.log_every == 0 or step == stop:
                    dt = max(time.perf_counter() - window_t0, 1e-9)
                    tps = tokens_per_step * window_steps / dt if window_steps else float("nan")
                    rec = {"step": step, "loss": loss, "nll": float(m["nll"]), "lr": float(m["lr"]), "grad_norm": gnorm,
                           "tokens_per_s": tps, "loss_tokens": float(m["tokens"]),
                           "tokens_seen": step * tokens_per_step, "step_time_s": dt / window_steps if window_steps else float("nan")}
                    if peak and window_steps:
                        rec["mfu"] = tps * fpt / (n_dev * peak)
                    logger.log(rec)
                    logger.progress(step, loss, tps if window_steps else None)
                    window_t0, window_steps = time.perf_counter(), 0
                if ckpt is not None and (step % cfg.checkpoint.every == 0 or pre.requested or step == stop):
                    ckpt.save(step, state, it.get_state(), cfg_dict, force=True)
                if pre.requested:
                    logger.write(f"SIGTERM: saved checkpoint at step {step}, exiting")
                    summary["preempted"] = True
                    break
                if cfg.eval.every and step % cfg.eval.every == 0 and step != total:
                    last_eval = _evaluate(trainer, state["params"], cfg, step, logger, eval_iter_fn)
                    window_t0 = time.perf_counter()
            if not summary["preempted"] and step == total and cfg.eval.at_end:
                last_eval = _evaluate(trainer, state["params"], cfg, step, logger, eval_iter_fn)
                logger.write("evaluation at step %d:\n%s" % (step, _eval_table(last_eval)))
    finally:
        if ckpt is not None:
            ckpt.close()
        logger.close()
    summary.update(step=step, loss=last_loss, eval=last_eval)
    summary["state"] = state
    return summary


def _text_eval_loss(trainer: Trainer, cfg: ExperimentConfig, data_factory, local_bs, pi, pc, params) -> float:
    """Mean token loss over ``data.text.eval_batches`` batches of the held-out files."""
    ds = data_factory(cfg, split="eval", batch_size=local_bs, process_index=pi, process_count=pc)
    fn = jax.jit(lambda p, b: _eval_sums(trainer.model, p, b))
    tot, n = 0.0, 0.0
    for i, batch in enumerate(ds):
        if i >= cfg.data.text.eval_batches:
            break
        with trainer.context():
            s, c = fn(params, trainer.global_batch(batch))
        tot, n = tot + float(s), n + float(c)
    return tot / max(n, 1.0)


def _eval_sums(model, params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return (nll * mask).sum(), mask.sum()
