"""The training loop: sharded train state, jitted step, checkpoint-resume, evaluation, logging.

``train(cfg, workdir)`` is the whole run; :class:`Trainer` (state, shardings, jitted step) is public so tests and
benchmarks can drive single steps. The step itself (loss, gradients, update) is :mod:`canon_jax.train.step`, the
evaluations :mod:`canon_jax.train.evaluation`, the inputs :mod:`canon_jax.train.inputs`.

Train state: ``{"step": int32 [], "params": pytree, "opt_state": optax state}``; float32 params and optimizer moments,
compute in ``model.dtype`` (bf16 on accelerators). Every array is laid out by the logical-axis rules of
:mod:`canon_jax.train.sharding` on a ``(data, fsdp, tensor)`` mesh; batches are split over ``(data, fsdp)``, each
process reading only its own slice of the global batch.

The loop never waits for the device between steps: the metrics stay on the device and are fetched at log steps, and
the losses and gradient norms of the steps in between are checked (one transfer) at every log step and before every
checkpoint save and evaluation. A divergence is therefore reported up to ``train.log_every`` steps (or
``checkpoint.every`` steps, if smaller) after it happened, always naming the first non-finite step, and a non-finite
state is never saved.
"""

from __future__ import annotations

import contextlib
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
from canon_jax.train.evaluation import Evaluator, eval_table
from canon_jax.train.flops import count_params, flops_per_token, peak_flops_per_device
from canon_jax.train.inputs import BATCH_KEYS, data_vocab_size, make_train_data
from canon_jax.train.metrics import MetricsLogger, read_metrics
from canon_jax.train.optimizer import make_optimizer
from canon_jax.train.step import build_train_step
from canon_jax.train.workdir import (
    WorkdirLock,
    check_workdir_path,
    config_changes,
    format_change,
    recorded_config,
    set_aside,
)

__all__ = ["train", "TrainingDiverged", "Trainer", "build_train_step", "make_model", "make_train_data", "BATCH_KEYS"]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised when the loss or gradient norm stops being finite; the message holds the diagnostic."""


def make_model(mc):
    from canon_jax.models import CausalLM

    return CausalLM(mc)


# ----------------------------------------------------------------------------------------------------------------------
class Trainer:
    """Everything a run needs, built from a validated config (model, mesh, optimizer, shardings, jitted step).

    Args:
      cfg: the experiment config.
      devices: devices of the mesh (default: all).
      model_factory: ``ModelConfig -> Linen module`` (default ``CausalLM``).
      mc: the model config of ``cfg`` when the caller has built it already (default: built here).
    """

    def __init__(self, cfg: ExperimentConfig, devices=None, model_factory: Callable = make_model, mc=None):
        self.cfg = cfg
        self.model_config = model_config(cfg) if mc is None else mc
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
        self._apply = jax.jit(lambda p, t: self.model.apply({"params": p}, t))

    # ----------------------------------------------------------------------------------------------------------------
    def context(self):
        """Mesh + logical-axis rules for tracing (activates the model's ``with_logical_constraint`` annotations)."""
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
        """Teacher-forced scoring for the evaluators: ``tokens [B, L] int -> logits [B, L, V] float32`` (numpy).
        Every call shares one jitted forward pass (compiled once per token shape)."""

        def fn(tokens):
            with self.context():
                return np.asarray(self._apply(params, jnp.asarray(tokens, jnp.int32)))

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


class _NonfiniteMonitor:
    """Keeps the loss, gradient norm and non-finite flags of every step since the last :meth:`check` on the device;
    ``check`` fetches the losses and norms in one transfer and raises :class:`TrainingDiverged` naming the first step
    where one of them is not finite."""

    def __init__(self, params):
        self._paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
        self._pending = []

    def record(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics["loss"], metrics["grad_norm"], metrics["nonfinite"]))

    def check(self) -> None:
        pending, self._pending = self._pending, []
        values = jax.device_get([(loss, grad_norm) for _, loss, grad_norm, _ in pending])
        for (step, _, _, flags), (loss, grad_norm) in zip(pending, values):
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                bad = [p for p, v in zip(self._paths, jax.device_get(flags)) if v]
                raise TrainingDiverged(_nonfinite_report(step, float(loss), float(grad_norm), bad))


def _nonfinite_report(step, loss, grad_norm, bad: list) -> str:
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
    trainer = Trainer(cfg, devices=devices, model_factory=model_factory, mc=mc)
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
        evaluator = Evaluator(trainer, cfg, data_factory, local_bs, pi, pc)
        return _train_in(trainer, evaluator, cfg, cfg_dict, workdir, it, notes)
    finally:
        if lock is not None:
            lock.release()


def _train_in(trainer: Trainer, evaluate: Evaluator, cfg, cfg_dict, workdir, it, notes) -> dict:
    pi = jax.process_index()
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
    fpt = flops_per_token(trainer.model_config, trainer.n_params, cfg.data.seq_len)
    peak = cfg.train.peak_flops_per_device or peak_flops_per_device()
    n_dev = trainer.mesh.size

    summary = {"start_step": start, "preempted": False, "n_params": trainer.n_params, "workdir": str(workdir)}
    last_eval = {}
    step = start
    # a finished run re-run: report its recorded final loss and evaluation instead of repeating them
    last_loss = next((r["loss"] for r in reversed(previous) if "loss" in r and r.get("step") == start), None)
    done_eval = {r["eval"]: r for r in previous if "eval" in r and r.get("step") == start}
    window_t0, window_steps = time.perf_counter(), 0
    nonfinite = _NonfiniteMonitor(trainer.abstract_state["params"])
    m = None
    try:
        with _Preemption() as pre:
            while step < stop:
                batch = next(it)
                state, m = trainer.step(state, batch)
                step += 1
                window_steps += 1
                nonfinite.record(step, m)
                if step == start + 1:  # exclude compilation (and the first execution) from the throughput window
                    jax.block_until_ready(m["loss"])
                    window_t0, window_steps = time.perf_counter(), 0
                if step % cfg.train.log_every == 0 or step == stop:
                    nonfinite.check()
                    loss = float(m["loss"])  # waits for this step: the window below times executed steps
                    dt = max(time.perf_counter() - window_t0, 1e-9)
                    tps = tokens_per_step * window_steps / dt if window_steps else float("nan")
                    rec = {
                        "step": step,
                        "loss": loss,
                        "nll": float(m["nll"]),
                        "lr": float(m["lr"]),
                        "grad_norm": float(m["grad_norm"]),
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
                    nonfinite.check()
                    ckpt.save(step, state, it.get_state(), cfg_dict, force=True)
                if pre.requested:
                    nonfinite.check()
                    if ckpt is not None:
                        ckpt.wait()
                        logger.write(f"{pre.requested}: saved a checkpoint at step {step}, exiting")
                    else:
                        logger.write(f"{pre.requested}: stopped at step {step} (checkpointing is disabled)")
                    summary["preempted"] = pre.requested
                    break
                if cfg.eval.every and step % cfg.eval.every == 0 and step != total:
                    nonfinite.check()
                    last_eval = evaluate(state["params"], step, logger)
                    window_t0 = time.perf_counter()
            if not summary["preempted"] and step == total and cfg.eval.at_end:
                if done_eval:
                    last_eval = done_eval
                    logger.write(f"evaluation at step {step} (recorded):\n{eval_table(done_eval)}")
                else:
                    nonfinite.check()
                    last_eval = evaluate(state["params"], step, logger)
    finally:
        if ckpt is not None:
            ckpt.close()
        logger.close()
    if m is not None:  # the last step's loss (every step since the last check is finite, or it raised above)
        last_loss = float(m["loss"])
    summary.update(step=step, loss=last_loss, eval=last_eval)
    summary["state"] = state
    return summary
