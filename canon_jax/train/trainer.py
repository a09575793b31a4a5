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
import signal
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from canon_jax.train import sharding as shd
from canon_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from canon_jax.train.config import (
    ConfigError,
    ExperimentConfig,
    check_batch_divides_mesh,
    check_sample_lengths,
    config_to_dict,
    model_config,
)
from canon_jax.train.flops import count_params, flops_per_token, peak_flops_per_device
from canon_jax.train.metrics import MetricsLogger, read_metrics
from canon_jax.train.optimizer import make_optimizer
from canon_jax.train.workdir import (
    WorkdirLock,
    check_workdir_path,
    config_changes,
    format_change,
    recorded_config,
    set_aside,
)

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
        "seq_len": d.seq_len,
        "loss_on": d.loss_on,
        "seed": d.seed,
        "num_workers": d.num_workers,
        "shuffle_buffer": d.shuffle_buffer,
        "split_long": d.split_long,
    }
    try:
        return DataConfig(**{k: v for k, v in values.items() if k in names})
    except (ValueError, TypeError) as e:  # unknown task / parameter: name the config key
        raise ConfigError(f"data.tasks: {str(e).splitlines()[0]}") from None


def make_train_data(cfg: ExperimentConfig, *, split: str, batch_size: int, process_index: int, process_count: int):
    """The grain dataset of this process's share of every global batch (dict of numpy arrays, COMMON.md format)."""
    if cfg.data.kind == "text" and cfg.data.text.train_tokens:
        from canon_jax.train.text_stream import make_token_dataset

        return make_token_dataset(
            cfg.data, split=split, batch_size=batch_size, process_index=process_index, process_count=process_count
        )
    if cfg.data.kind == "text":
        from canon_jax.train.text_data import make_text_dataset

        return make_text_dataset(
            cfg.data, split=split, batch_size=batch_size, process_index=process_index, process_count=process_count
        )
    from canon_jax.data import make_dataset

    return make_dataset(
        _data_config(cfg), split=split, batch_size=batch_size, process_index=process_index, process_count=process_count
    )


def data_vocab_size(cfg: ExperimentConfig) -> int | None:
    """Vocabulary the data needs (None when unknown)."""
    if cfg.data.kind == "text" and cfg.data.text.train_tokens:
        from canon_jax.data.shards import TokenShards

        return TokenShards(cfg.data.text.train_tokens).vocab_size
    if cfg.data.kind == "text":
        from canon_jax.train.text_data import load_tokenizer

        return load_tokenizer(cfg.data.text.tokenizer).get_vocab_size()
    return _data_config(cfg).vocab_size()


# ----------------------------------------------------------------------------------------------------------------------
# Train step
def _model_loss(model, params, batch, mask, chunk_size: int, z_loss: str = "none", z_loss_weight: float = 0.0):
    """``cross_entropy`` of the model on a batch; with ``chunk_size > 0`` from the hidden states and head weight
    (:func:`canon_jax.losses.chunked_cross_entropy`), never materialising the float32 logits."""
    from canon_jax.losses import chunked_cross_entropy, cross_entropy

    kwargs = {}
    if model.config.segment_aware:
        # Official recipe (SPEC 0.9): plain causal attention and window positions across packed documents; the
        # document structure is only used when segment-aware masking is switched on.
        kwargs = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}
    if chunk_size:
        hidden, head, layout = model.apply({"params": params}, batch["inputs"], return_hidden=True, **kwargs)
        return chunked_cross_entropy(
            hidden,
            head,
            batch["targets"],
            mask,
            head_layout=layout,
            chunk_size=chunk_size,
            z_loss=z_loss,
            z_loss_weight=z_loss_weight,
        )
    logits = model.apply({"params": params}, batch["inputs"], **kwargs)
    return cross_entropy(logits, batch["targets"], mask, z_loss=z_loss, z_loss_weight=z_loss_weight)


def _loss_terms(model, cfg: ExperimentConfig, params, batch, total_tokens):
    """Loss of one (micro-)batch, weighted so micro-batch terms sum to the full batch's token mean."""
    mask = batch["loss_mask"].astype(jnp.float32)
    loss, aux = _model_loss(
        model, params, batch, mask, cfg.train.loss_chunk_size, cfg.optim.z_loss, cfg.optim.z_loss_weight
    )
    # cross_entropy is a masked mean (0 for an all-masked micro-batch); re-weight by this micro-batch's share.
    w = mask.sum() / total_tokens
    return loss * w, aux["nll"] * w


def build_train_step(model, cfg: ExperimentConfig, tx, schedule, mesh=None, param_shardings=None):
    """``step(state, batch) -> (state, metrics)`` (not jitted). ``metrics``: loss, grad_norm, lr, tokens,
    nonfinite (tree of per-parameter flags: gradient leaf has a non-finite entry).

    ``param_shardings`` (the parameters' shardings): gradients are constrained to them as soon as they are computed,
    so that under FSDP each weight gradient is reduce-scattered to its shard instead of all-reduced in full on every
    device (and micro-batch gradients are accumulated as shards).
    """
    accum = cfg.train.grad_accum

    def shard_like_params(tree):
        if param_shardings is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, param_shardings)

    def step_fn(state, batch):
        params = state["params"]
        total = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
        value_and_grad = jax.value_and_grad(lambda p, b: _loss_terms(model, cfg, p, b, total), has_aux=True)

        def grad_fn(p, b):
            out, g = value_and_grad(p, b)
            return out, shard_like_params(g)

        if accum == 1:
            (loss, nll), grads = grad_fn(params, batch)
        else:

            def split(x):  # [B, ...] -> [accum, B/accum, ...] keeping each device's rows on the device
                x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
                if mesh is not None:
                    x = jax.lax.with_sharding_constraint(
                        x, NamedSharding(mesh, P(None, ("data", "fsdp"), *([None] * (x.ndim - 2))))
                    )
                return x

            micro = jax.tree.map(split, batch)

            def body(carry, mb):
                (l, n), g = grad_fn(params, mb)
                return (carry[0] + l, carry[1] + n, jax.tree.map(jnp.add, carry[2], g)), None

            zeros = shard_like_params(jax.tree.map(jnp.zeros_like, params))
            zero = jnp.zeros((), jnp.float32)
            (loss, nll, grads), _ = jax.lax.scan(body, (zero, zero, zeros), micro)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}
        metrics = {
            "loss": loss,
            "nll": nll,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "tokens": batch["loss_mask"].astype(jnp.float32).sum(),
            "nonfinite": jax.tree.map(lambda g: ~jnp.all(jnp.isfinite(g)), grads),
        }
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
        check_batch_divides_mesh(cfg, dict(self.mesh.shape))
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
        opt_sh = optax.tree_map_params(
            self.tx, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: replicated
        )
        self.state_shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh}
        self.abstract_state = {
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "params": abstract_params,
            "opt_state": abstract_opt,
        }
        self.n_params = count_params(abstract_params)
        self.batch_sharding = shd.batch_sharding(self.mesh)

        def init_state(rng):
            params = nn.meta.unbox(init_boxed(rng))
            return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

        with self.context():
            self._init = jax.jit(init_state, out_shardings=self.state_shardings)
        step_fn = build_train_step(self.model, cfg, self.tx, self.schedule, self.mesh, param_sh)
        batch_sh = {k: self.batch_sharding for k in BATCH_KEYS}
        self._step = jax.jit(
            step_fn,
            in_shardings=(self.state_shardings, batch_sh),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )

    # ----------------------------------------------------------------------------------------------------------------
    def context(self):
        """Mesh + logical-axis rules for tracing (activates the model's ``with_logical_constraint`` annotations)."""
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(shd.LOGICAL_RULES))
        return stack

    def init_state(self, seed: int | None = None):
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

    def abstract_batch(self) -> dict:
        """Shapes, dtypes and shardings of one global batch (what :meth:`step` receives)."""
        shape = (self.cfg.train.batch_size, self.seq_len)
        return {
            k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=self.batch_sharding)
            for k in BATCH_KEYS
        }

    def lower_step(self):
        """The jitted train step lowered for abstract state and batch (``.compile()`` it, e.g. for another machine)."""
        with self.context():
            return self._step.lower(self.restore_target(), self.abstract_batch())

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
                out = generate(
                    self.model,
                    params,
                    jnp.asarray(prompts, jnp.int32),
                    int(max_new_tokens),
                    temperature=temperature,
                    rng=rng,
                    prompt_mask=jnp.asarray(prompt_mask, bool),
                )
            return np.asarray(out)

        return fn


# ----------------------------------------------------------------------------------------------------------------------
def _nonfinite_report(step, loss, grad_norm, flags) -> str:
    bad = [jax.tree_util.keystr(path) for path, v in jax.tree_util.tree_leaves_with_path(flags) if bool(v)]
    shown = ", ".join(bad[:10]) + (f" ... (+{len(bad) - 10} more)" if len(bad) > 10 else "")
    return (
        f"non-finite training at step {step}: loss={loss}, grad_norm={grad_norm}; parameters with non-finite "
        f"gradients: {shown or 'none (the loss itself overflowed)'}. The run stopped without saving; the last "
        f"good checkpoint is kept."
    )


class _Preemption:
    """SIGTERM / SIGINT (Ctrl-C) handler: records the request; the loop saves at the current step and exits cleanly.

    A second SIGINT while the first is pending aborts at once (``KeyboardInterrupt``, nothing saved)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = None  # name of the signal received
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.requested is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print(
                ("\n" if sys.stderr.isatty() else "") + "Ctrl-C: a checkpoint will be saved after the current step "
                "(Ctrl-C again aborts without saving)",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _evaluate(trainer: Trainer, params, cfg: ExperimentConfig, step: int, logger: MetricsLogger, eval_iter_fn):
    """Run the configured evaluations; log one record per task (and the validation loss for text runs)."""
    results = {}
    if cfg.data.kind == "text":
        loss = eval_iter_fn(params)
        rec = {"step": step, "eval": "text", "eval_loss": loss}
        logger.log(rec, prefix="eval")
        results["text"] = rec
        logger.write(f"evaluation at step {step}: held-out loss {loss:.4f}")
        return results
    from canon_jax.eval import evaluate

    logits_fn = trainer.logits_fn(params)
    vocab = _data_config(cfg)  # token ids of the training mix
    for t in cfg.eval.tasks or cfg.data.tasks:
        t0 = time.perf_counter()
        # Lano's generation accuracy samples at temperature 1 (SPEC 0.6); the other generation tasks are greedy.
        generate_fn = trainer.generate_fn(params, temperature=1.0 if t.name == "lano" else 0.0)
        extra = {"num_params": trainer.n_params} if t.name == "capo" else {}
        m = evaluate(
            t.name,
            dict(t.params),
            logits_fn=logits_fn,
            generate_fn=generate_fn,
            vocab=vocab,
            num_samples=cfg.eval.num_samples,
            batch_size=cfg.eval.batch_size,
            seed=cfg.eval.seed,
            **extra,
        )
        rec = {
            "step": step,
            "eval": t.name,
            **{f"{t.name}/{k}": v for k, v in _flatten(m).items()},
            "eval_seconds": time.perf_counter() - t0,
        }
        logger.log(rec, prefix="eval")
        results[t.name] = rec
    logger.write(f"evaluation at step {step}:\n{_eval_table(results)}")
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
            val = (
                (str(int(v)) if float(v).is_integer() and "count" in k else f"{v:.4f}")
                if isinstance(v, float)
                else str(v)
            )
            lines.append(f"| {name} | {k.split('/', 1)[-1]} | {val} |")
    return "\n".join(lines)


def train(
    cfg: ExperimentConfig,
    workdir,
    *,
    devices=None,
    model_factory: Callable = make_model,
    data_factory: Callable = make_train_data,
) -> dict:
    """Train (or resume) the run described by ``cfg`` in ``workdir``; returns a summary dict.

    Every check that can fail on the config or the paths raises :class:`ConfigError` before a file is written. Then
    the workdir is locked (:class:`~canon_jax.train.workdir.WorkdirBusy` if another live run holds it) and a run
    already in it is continued only if its recorded config differs in settings that may change on resume
    (:func:`~canon_jax.train.workdir.config_changes`; the changes are printed), else ConfigError and nothing is
    touched. Resumes from the newest undamaged checkpoint (damaged ones are moved aside and announced). Writes
    ``metrics.jsonl``, TensorBoard events, ``config.json``. SIGTERM or Ctrl-C saves a checkpoint at the current step
    and returns (``summary["preempted"]``: the signal's name). Raises :class:`TrainingDiverged` on a non-finite
    loss/grad-norm (no checkpoint is written for that state).
    """
    shd.maybe_initialize_distributed(cfg.mesh)
    workdir = check_workdir_path(workdir)
    mc = model_config(cfg)
    need = data_vocab_size(cfg)
    if need is not None and need > mc.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {mc.vocab_size} is smaller than the data's vocabulary ({need}); "
            f"set model.vocab_size >= {need}"
        )
    check_sample_lengths(cfg)
    pc, pi = jax.process_count(), jax.process_index()
    if cfg.train.batch_size % pc:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by the {pc} processes")
    trainer = Trainer(cfg, devices=devices, model_factory=model_factory)
    local_bs = cfg.train.batch_size // pc
    dataset = data_factory(cfg, split="train", batch_size=local_bs, process_index=pi, process_count=pc)
    it = iter(dataset)
    cfg_dict = config_to_dict(cfg)

    # From here on files are written: only under the lock, and only for a run this config may continue.
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir) if pi == 0 else None
    notes = [lock.acquire()] if lock is not None else []
    try:
        old = recorded_config(workdir)
        if old is not None:
            refused, allowed = config_changes(old, cfg_dict)
            if refused:
                also = f" (also {', '.join(c[0] for c in refused[1:])})" if len(refused) > 1 else ""
                key, was, now = refused[0]
                raise ConfigError(
                    f"{key}: the run in {workdir} was trained with {json.dumps(was)}, this config has "
                    f"{json.dumps(now)}{also}; a model/data change cannot continue that run: start a fresh run in a "
                    f"new --workdir (the old run is left untouched)"
                )
            if allowed:
                notes.append("resuming with changed settings: " + ", ".join(format_change(c) for c in allowed))
        return _train_in(trainer, cfg, cfg_dict, workdir, it, notes, data_factory, local_bs, pi, pc, mc)
    finally:
        if lock is not None:
            lock.release()


def _train_in(trainer, cfg, cfg_dict, workdir, it, notes, data_factory, local_bs, pi, pc, mc) -> dict:
    if pi == 0:
        (workdir / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    ckpt = (
        Checkpointer(workdir / "checkpoints", cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.async_save)
        if cfg.checkpoint.enabled
        else None
    )
    restored = ckpt.restore(trainer.restore_target()) if ckpt is not None else None
    damaged = ckpt.damaged if ckpt is not None else []
    if damaged:
        where = damaged[0].moved_to.parent
        what = (
            f"damaged checkpoint(s) at step(s) {', '.join(str(d.step) for d in damaged)} ({damaged[0].reason}) "
            f"moved to {where}"
        )
        if restored is not None:
            notes.append(f"{what}; resuming from step {restored[0]}")
        else:
            notes.append(f"No usable checkpoint: starting from step 0 ({what})")
            if pi == 0 and (workdir / "metrics.jsonl").exists():  # the old attempt's records stay with its steps
                set_aside(workdir / "metrics.jsonl", where)
    if restored is not None:
        start, state, data_state = restored
        it.set_state(data_state)
        log.info("resumed from step %d", start)
    else:
        start, state = 0, trainer.init_state()
    total = cfg.train.steps
    stop = cfg.train.stop_after or total
    logger = MetricsLogger(
        workdir, total, start_step=start, tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress
    )
    for note in notes:
        if note:
            logger.write(note)
    previous = read_metrics(workdir / "metrics.jsonl") if restored is not None and start >= stop else []
    if restored is not None and not damaged:  # (a fallback was announced above with its step)
        logger.write(
            f"resumed from checkpoint at step {start}"
            + (f": the run is already at step {start} of {total}, nothing to train" if start >= stop else "")
        )
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
    # a finished run re-run: report its recorded final loss and evaluation instead of repeating them
    last_loss = next((r["loss"] for r in reversed(previous) if "loss" in r and r.get("step") == start), None)
    done_eval = {r["eval"]: r for r in previous if "eval" in r and r.get("step") == start}
    window_t0, window_steps = time.perf_counter(), 0
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
                    rec = {
                        "step": step,
                        "loss": loss,
                        "nll": float(m["nll"]),
                        "lr": float(m["lr"]),
                        "grad_norm": gnorm,
                        "tokens_per_s": tps,
                        "loss_tokens": float(m["tokens"]),
                        "tokens_seen": step * tokens_per_step,
                        "step_time_s": dt / window_steps if window_steps else float("nan"),
                    }
                    if peak and window_steps:
                        rec["mfu"] = tps * fpt / (n_dev * peak)
                    logger.log(rec)
                    logger.progress(step, loss, tps if window_steps else None)
                    window_t0, window_steps = time.perf_counter(), 0
                if ckpt is not None and (step % cfg.checkpoint.every == 0 or pre.requested or step == stop):
                    ckpt.save(step, state, it.get_state(), cfg_dict, force=True)
                if pre.requested:
                    if ckpt is not None:
                        ckpt.wait()
                        logger.write(f"{pre.requested}: saved a checkpoint at step {step}, exiting")
                    else:
                        logger.write(f"{pre.requested}: stopped at step {step} (checkpointing is disabled)")
                    summary["preempted"] = pre.requested
                    break
                if cfg.eval.every and step % cfg.eval.every == 0 and step != total:
                    last_eval = _evaluate(trainer, state["params"], cfg, step, logger, eval_iter_fn)
                    window_t0 = time.perf_counter()
            if not summary["preempted"] and step == total and cfg.eval.at_end:
                if done_eval:
                    last_eval = done_eval
                    logger.write(f"evaluation at step {step} (recorded):\n{_eval_table(done_eval)}")
                else:
                    last_eval = _evaluate(trainer, state["params"], cfg, step, logger, eval_iter_fn)
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
    fn = jax.jit(lambda p, b: _eval_sums(trainer.model, p, b, cfg.train.loss_chunk_size))
    tot, n = 0.0, 0.0
    for i, batch in enumerate(ds):
        if i >= cfg.data.text.eval_batches:
            break
        with trainer.context():
            s, c = fn(params, trainer.global_batch(batch))
        tot, n = tot + float(s), n + float(c)
    return tot / max(n, 1.0)


def _eval_sums(model, params, batch, chunk_size: int):
    mask = batch["loss_mask"].astype(jnp.float32)
    _, aux = _model_loss(model, params, batch, mask, chunk_size)
    return aux["nll"] * aux["num_tokens"], aux["num_tokens"]
