"""canon_jax.eval: one evaluator per synthetic task behind a single registry.

    evaluate(task_name, task_params, *, logits_fn=None, generate_fn=None, num_samples, batch_size, seed, vocab=None)

``logits_fn(tokens [B, L]) -> [B, L, V]`` (teacher forcing) or ``generate_fn(prompts [B, P], prompt_mask [B, P],
max_new_tokens, rng) -> [B, N]`` (see :mod:`canon_jax.eval.common`).  ``vocab`` is the training mix (a
``canon_jax.data.Vocabulary`` or ``DataConfig``) so that the task uses the ids the model was trained on; default: the
task alone.  Which function each task needs: depo, mano, capo → ``logits_fn``; brevo → ``generate_fn``; lano → both
(generation accuracy needs ``generate_fn``, KL needs ``logits_fn``).  Returns a flat dict of metrics.
"""

from __future__ import annotations

from typing import Any

from canon_jax.data import base
from canon_jax.data.vocab import Vocabulary
from canon_jax.eval import lano as lano_eval
from canon_jax.eval.brevo import evaluate_brevo
from canon_jax.eval.capo import evaluate_capo
from canon_jax.eval.depo import evaluate_depo
from canon_jax.eval.mano import evaluate_mano


def _evaluate_lano(task, *, max_new_tokens: int | None = None, **kwargs) -> dict:
    """Adapter to the Lano evaluator :func:`canon_jax.eval.lano.evaluate_lano`.

    Hands it the task's grammar and this task's token ids (``token_map``: BOS, EOS and the global id of every
    terminal); the generation budget defaults to the grammar's longest string + EOS.  Other keywords (``kl_on``,
    ``kl_epsilon``, ``length_multiple``) pass through.
    """
    num_sym = int(task.cfg.num_sym)
    terminal_ids = [int(task.sample_token(t)) for t in range(1, num_sym + 1)]
    if max_new_tokens is None:
        max_new_tokens = int(task.cfg.max_len) + 1
    return lano_eval.evaluate_lano(
        task.cfg,
        token_map={"bos_id": base.BOS, "eos_id": base.EOS, "terminal_ids": terminal_ids},
        max_new_tokens=max_new_tokens,
        **kwargs,
    )


_EVALUATORS = {
    "depo1": evaluate_depo,
    "depo2": evaluate_depo,
    "brevo1": evaluate_brevo,
    "brevo2": evaluate_brevo,
    "mano": evaluate_mano,
    "capo": evaluate_capo,
    "lano": _evaluate_lano,
}


def _resolve_task(task_name: str, task_params: dict | None, vocab: Any):
    if task_name not in _EVALUATORS:
        raise ValueError(f"unknown task {task_name!r}; valid tasks: {sorted(_EVALUATORS)}")
    params = dict(task_params or {})
    if vocab is None:
        return base.get_task(task_name, **params)
    if hasattr(vocab, "vocabulary"):  # a DataConfig
        vocab = vocab.vocabulary()
    if not isinstance(vocab, Vocabulary):
        raise TypeError(f"vocab must be a Vocabulary or DataConfig, got {type(vocab).__name__}")
    return vocab.task(task_name, **params)


def evaluate(
    task_name: str,
    task_params: dict | None = None,
    *,
    logits_fn=None,
    generate_fn=None,
    num_samples: int = 100,
    batch_size: int = 16,
    seed: int = 0,
    vocab=None,
    **kwargs,
) -> dict:
    """Evaluate a model on ``num_samples`` test samples of a task; ``kwargs`` go to the task's evaluator (e.g.
    ``num_params`` for capo)."""
    task = _resolve_task(task_name, task_params, vocab)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return _EVALUATORS[task_name](
        task,
        logits_fn=logits_fn,
        generate_fn=generate_fn,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        **kwargs,
    )


__all__ = ["evaluate"]
