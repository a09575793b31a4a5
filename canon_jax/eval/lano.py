"""Lano evaluator (docs/tasks.md, "Evaluation"): generation accuracy and KL to the grammar's true next-token
distribution.

* **Generation accuracy**: ``num_samples`` strings are sampled from the model starting from BOS (temperature 1 is the
  caller's ``generate_fn``'s job), each cut at its first EOS; the share the grammar accepts. A string with no EOS within
  ``max_new_tokens``, or with any token that is not one of the grammar's terminals, is invalid (never an error).
* **KL(true || model)**: for a valid string ``w`` of length ``n`` the model reads ``[BOS, w_1 .. w_n]`` and its
  logits at position ``t`` give its next-token distribution after ``w[:t]`` (``t = 0..n``, so ``n + 1`` positions,
  the last one predicting EOS). The model's distribution is restricted to the ``[EOS, terminal 1 .. num_sym]``
  columns and renormalised, then compared with :meth:`CFG.next_token_logprobs` (float64, log space)::

      KL_t = sum_c p_true[t, c] * (log p_true[t, c] - log p_model[t, c])

  averaged over the positions of each string, then over strings (``kl``); ``kl_pooled`` averages over all positions
  of all strings at once. Columns with ``p_true = 0`` contribute 0. No smoothing by default (``kl_epsilon = 0``): the
  restricted softmax is strictly positive for finite logits, so the KL is finite. ``kl_epsilon > 0`` applies the
  smoothing of the official release's KL demo (1e-5 there): add eps to both distributions and renormalise,
  ``(p + eps) / (1 + K * eps)`` over the ``K = 1 + num_sym`` columns, before the KL.

Which strings the KL is measured on (``kl_on``):

* ``"grammar"``: ``num_samples`` fresh strings sampled from the grammar -> keys ``kl``, ``kl_pooled``, ``kl_max``,
  ``num_kl_strings``, ``num_kl_positions``. This is ``E_{w ~ grammar}`` of the per-position KL: defined for any model
  (also an untrained one, or when only ``logits_fn`` is given) and not biased by which strings the model manages to
  generate. It is the primary number.
* ``"generated"``: the model's own accepted generations -> the same keys with ``kl_generated`` in place of ``kl``
  (``kl_generated``, ``kl_generated_pooled``, ``kl_generated_max``, ``num_kl_generated_strings``,
  ``num_kl_generated_positions``); NaN when no generation was accepted.
* ``"both"`` (default when both functions are given; otherwise ``"grammar"``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from canon_jax.data.lano_grammar import CFG

__all__ = ["LanoTokenMap", "evaluate_lano", "parse_generations", "kl_true_vs_model"]


@dataclass(frozen=True)
class LanoTokenMap:
    """How a model's vocabulary encodes a Lano grammar's symbols.

    Attributes:
      bos_id: model id that starts every string (the generation prompt).
      eos_id: model id that ends a string.
      terminal_ids: ``terminal_ids[k]`` = model id of grammar terminal ``k + 1`` (length ``num_sym``).
    """

    bos_id: int
    eos_id: int
    terminal_ids: tuple

    def __post_init__(self):
        object.__setattr__(self, "terminal_ids", tuple(int(t) for t in self.terminal_ids))
        ids = (int(self.bos_id), int(self.eos_id)) + self.terminal_ids
        if min(ids) < 0:
            raise ValueError(
                f"LanoTokenMap: ids must be >= 0, got bos={self.bos_id}, eos={self.eos_id}, "
                f"terminal_ids={self.terminal_ids}"
            )
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"LanoTokenMap: bos_id, eos_id and terminal_ids must all be distinct, got "
                f"bos={self.bos_id}, eos={self.eos_id}, terminal_ids={self.terminal_ids}"
            )

    @classmethod
    def coerce(cls, token_map: LanoTokenMap | Mapping) -> LanoTokenMap:
        """Accepts a ``LanoTokenMap`` or a mapping with keys ``bos_id``, ``eos_id``, ``terminal_ids``."""
        if isinstance(token_map, cls):
            return token_map
        if isinstance(token_map, Mapping):
            missing = {"bos_id", "eos_id", "terminal_ids"} - set(token_map)
            extra = set(token_map) - {"bos_id", "eos_id", "terminal_ids"}
            if missing or extra:
                raise ValueError(
                    f"token_map: expected keys bos_id, eos_id, terminal_ids; missing {sorted(missing)}, "
                    f"unknown {sorted(extra)}"
                )
            return cls(int(token_map["bos_id"]), int(token_map["eos_id"]), tuple(token_map["terminal_ids"]))
        raise TypeError(f"token_map must be a LanoTokenMap or a mapping, got {type(token_map).__name__}")

    def check(self, cfg: CFG) -> None:
        if len(self.terminal_ids) != cfg.num_sym:
            raise ValueError(
                f"token_map.terminal_ids has {len(self.terminal_ids)} ids but grammar {cfg.name!r} has "
                f"num_sym = {cfg.num_sym} terminals"
            )

    @property
    def columns(self) -> np.ndarray:
        """Model vocabulary columns of ``[EOS, terminal 1, ..., num_sym]``."""
        return np.array((self.eos_id,) + self.terminal_ids, np.int64)

    def encode(self, terminals: Sequence[int]) -> np.ndarray:
        """Grammar terminal ids (``1..num_sym``) -> model ids."""
        table = np.array(self.terminal_ids, np.int64)
        return table[np.asarray(terminals, np.int64) - 1]


def parse_generations(tokens: np.ndarray, token_map: LanoTokenMap):
    """Cuts model outputs at their first EOS and maps them to grammar terminals.

    Args:
      tokens: ``[batch, n]`` model ids (generated tokens, prompt excluded).
      token_map: the vocabulary mapping.
    Returns:
      ``(strings, status)``: ``strings[b]`` is a list of terminal ids (``None`` when malformed) and ``status[b]`` one
      of ``"ok"``, ``"no_eos"`` (no EOS among the ``n`` tokens), ``"foreign"`` (a token before EOS is not a
      terminal).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"parse_generations: tokens must be [batch, n], got shape {tokens.shape}")
    to_terminal = {m: k + 1 for k, m in enumerate(token_map.terminal_ids)}
    strings, status = [], []
    for row in tokens.tolist():
        if token_map.eos_id not in row:
            strings.append(None)
            status.append("no_eos")
            continue
        body = row[: row.index(token_map.eos_id)]
        mapped = [to_terminal.get(int(t)) for t in body]
        if any(m is None for m in mapped):
            strings.append(None)
            status.append("foreign")
            continue
        strings.append(mapped)
        status.append("ok")
    return strings, status


def kl_true_vs_model(true_logprobs: np.ndarray, model_logits: np.ndarray, *, epsilon: float = 0.0) -> np.ndarray:
    """Per-position ``KL(true || model)`` over the same ``K`` columns.

    Args:
      true_logprobs: ``[positions, K]`` log-probabilities (rows sum to 1; ``-inf`` = probability 0).
      model_logits: ``[positions, K]`` the model's logits restricted to those columns (renormalised here).
      epsilon: smoothing, see the module docstring (0 = exact KL).
    Returns:
      ``[positions]`` float64 KL values (``inf`` where the model gives probability 0 to a possible token).
    """
    p_log = np.asarray(true_logprobs, np.float64)
    q_logits = np.asarray(model_logits, np.float64)
    if p_log.shape != q_logits.shape or p_log.ndim != 2:
        raise ValueError(
            f"kl_true_vs_model: expected two [positions, K] arrays of one shape, got {p_log.shape} and {q_logits.shape}"
        )
    if epsilon < 0:
        raise ValueError(f"kl_true_vs_model: epsilon must be >= 0, got {epsilon}")
    q_log = q_logits - _logsumexp_rows(q_logits)[:, None]
    if epsilon > 0:
        k = p_log.shape[1]
        p = (np.exp(p_log) + epsilon) / (1 + k * epsilon)
        q = (np.exp(q_log) + epsilon) / (1 + k * epsilon)
        return np.sum(p * (np.log(p) - np.log(q)), axis=1)
    p = np.exp(p_log)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (p_log - q_log), 0.0)
    return terms.sum(axis=1)


def _logsumexp_rows(a: np.ndarray) -> np.ndarray:
    m = np.max(a, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.sum(np.exp(a - m), axis=1, keepdims=True)) + m)[:, 0]


GenerateFn = Callable[[np.ndarray, np.ndarray, int, object], np.ndarray]
LogitsFn = Callable[[np.ndarray], np.ndarray]


def evaluate_lano(
    cfg_name: str | CFG,
    *,
    token_map: LanoTokenMap | Mapping,
    max_new_tokens: int,
    generate_fn: GenerateFn | None = None,
    logits_fn: LogitsFn | None = None,
    num_samples: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    kl_on: str | None = None,
    kl_epsilon: float = 0.0,
    length_multiple: int = 128,
    max_length: int | None = None,
) -> dict:
    """Generation accuracy and KL(true || model) of a model on a Lano grammar.

    Args:
      cfg_name: grammar name (``CFG.names()``) or a :class:`CFG`.
      token_map: :class:`LanoTokenMap` (or mapping with ``bos_id``, ``eos_id``, ``terminal_ids``).
      max_new_tokens: generation budget per string (EOS included); longer strings are invalid.
      generate_fn: ``(prompts [B, 1] int32, prompt_mask [B, 1] bool, max_new_tokens, rng) -> [B, N] int32``
        new tokens sampled at temperature 1; ``rng`` is a ``jax.random.key`` (a different one per batch).
      logits_fn: ``(tokens [B, L] int32) -> [B, L, V]`` logits (causal: position ``t`` predicts token ``t + 1``).
        Rows are right-padded with EOS to a multiple of ``length_multiple`` and the batch to ``batch_size``, so the
        shapes are few and a jitted function compiles a few times only.
      num_samples: strings generated, and grammar strings scored for the KL.
      batch_size: rows per call of ``generate_fn`` / ``logits_fn``.
      seed: seeds the generation keys and the grammar sampler.
      kl_on: ``"grammar"``, ``"generated"`` or ``"both"`` (see the module docstring); default ``"both"`` when both
        functions are given, else ``"grammar"``.
      kl_epsilon: KL smoothing (0 = exact; see the module docstring).
      length_multiple: padding multiple of the ``logits_fn`` sequence length.
      max_length: the model's context (BOS included), or None. Longer strings are scored on their first
        ``max_length`` positions only, which is exact for those positions (row ``t`` of the true distribution depends
        only on the prefix ``w[:t]``), so the KL stays unbiased per position.
    Returns:
      dict with ``cfg``; with ``generate_fn``: ``num_generated``, ``gen_accuracy``, ``num_accepted``,
      ``num_no_eos``, ``num_foreign``, ``mean_generated_length`` (accepted strings; absent if none); with
      ``logits_fn``: the KL keys of the module docstring.
    """
    cfg = cfg_name if isinstance(cfg_name, CFG) else CFG.load(cfg_name)
    tmap = LanoTokenMap.coerce(token_map)
    tmap.check(cfg)
    if generate_fn is None and logits_fn is None:
        raise ValueError("evaluate_lano: give generate_fn, logits_fn or both")
    for name, value in (
        ("num_samples", num_samples),
        ("batch_size", batch_size),
        ("max_new_tokens", max_new_tokens),
        ("length_multiple", length_multiple),
        ("max_length", 1 if max_length is None else max_length),
    ):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"evaluate_lano: {name} must be a positive int, got {value!r}")
    if kl_on is None:
        kl_on = "both" if generate_fn is not None and logits_fn is not None else "grammar"
    if kl_on not in ("grammar", "generated", "both"):
        raise ValueError(f"evaluate_lano: kl_on must be 'grammar', 'generated' or 'both', got {kl_on!r}")
    if kl_on != "grammar" and (generate_fn is None or logits_fn is None):
        raise ValueError(f"evaluate_lano: kl_on={kl_on!r} needs both generate_fn and logits_fn")

    result: dict = {"cfg": cfg.name}
    accepted: list[list[int]] = []
    if generate_fn is not None:
        accepted = _generate_and_check(cfg, tmap, generate_fn, num_samples, batch_size, max_new_tokens, seed, result)
    if logits_fn is not None:
        if kl_on in ("grammar", "both"):
            strings = cfg.sample_batch(np.random.default_rng(seed), num_samples)
            result.update(_kl(cfg, tmap, logits_fn, strings, batch_size, kl_epsilon, length_multiple, max_length, "kl"))
        if kl_on in ("generated", "both"):
            result.update(
                _kl(cfg, tmap, logits_fn, accepted, batch_size, kl_epsilon, length_multiple, max_length, "kl_generated")
            )
    return result


def _generate_and_check(cfg, tmap, generate_fn, num_samples, batch_size, max_new_tokens, seed, result):
    import jax  # local: the grammar tools above do not need JAX

    base_key = jax.random.key(seed)
    strings, status = [], []
    for b, start in enumerate(range(0, num_samples, batch_size)):
        prompts = np.full((batch_size, 1), tmap.bos_id, np.int32)
        mask = np.ones((batch_size, 1), bool)
        try:
            out = np.asarray(generate_fn(prompts, mask, max_new_tokens, jax.random.fold_in(base_key, b)))
        except (TypeError, ValueError):  # e.g. ragged rows: not an array
            out = np.zeros(0)
        if out.ndim != 2 or out.shape[0] != batch_size:  # malformed: every row of the batch is invalid
            warnings.warn(
                f"evaluate_lano: generate_fn must return [batch={batch_size}, N] tokens, got shape "
                f"{out.shape}; the batch is scored invalid",
                RuntimeWarning,
                stacklevel=3,
            )
            out = np.full((batch_size, max_new_tokens), -1, np.int64)
        out = out[: min(batch_size, num_samples - start)]
        if not np.issubdtype(out.dtype, np.integer):  # not token ids at all: every row is malformed
            out = np.full(out.shape, -1, np.int64)
        s, st = parse_generations(out, tmap)
        strings += s
        status += st
    ok_idx = [i for i, st in enumerate(status) if st == "ok"]
    verdict = np.zeros(len(strings), bool)
    if ok_idx:
        verdict[ok_idx] = cfg.accepts([strings[i] for i in ok_idx])
    accepted = [strings[i] for i in np.flatnonzero(verdict)]
    result.update(
        num_generated=len(strings),
        gen_accuracy=float(verdict.mean()),
        num_accepted=int(verdict.sum()),
        num_no_eos=status.count("no_eos"),
        num_foreign=status.count("foreign"),
    )
    if accepted:
        result["mean_generated_length"] = float(np.mean([len(s) for s in accepted]))
    return accepted


def _kl(cfg, tmap, logits_fn, strings, batch_size, epsilon, length_multiple, max_length, prefix):
    per_string, pooled_sum, pooled_n = [], 0.0, 0
    cols = tmap.columns
    if max_length is not None:  # [BOS] + max_length - 1 tokens: rows 0 .. max_length - 1
        strings = [s[: max_length - 1] for s in strings]
    for start in range(0, len(strings), batch_size):
        chunk = strings[start : start + batch_size]
        longest = max(len(s) for s in chunk) + 1
        length = -(-longest // length_multiple) * length_multiple
        if max_length is not None:
            length = min(length, max_length)
        tokens = np.full((batch_size, length), tmap.eos_id, np.int32)
        for r, s in enumerate(chunk):
            tokens[r, 0] = tmap.bos_id
            tokens[r, 1 : len(s) + 1] = tmap.encode(s)
        try:
            logits = np.asarray(logits_fn(tokens), dtype=np.float64)
        except (TypeError, ValueError):
            logits = np.zeros(0)
        if logits.ndim != 3 or logits.shape[:2] != tokens.shape or logits.shape[2] <= cols.max():
            # malformed (wrong shape, too few vocabulary columns, not numbers): infinitely far from the truth
            warnings.warn(
                f"evaluate_lano: logits_fn must return [batch, length, vocab > {int(cols.max())}] for "
                f"tokens of shape {tokens.shape}, got {logits.shape}; KL = inf for the batch",
                RuntimeWarning,
                stacklevel=3,
            )
            for s in chunk:
                per_string.append(math.inf)
                pooled_sum += math.inf
                pooled_n += len(s) + 1
            continue
        for r, s in enumerate(chunk):
            true = cfg.next_token_logprobs(s)  # [n + 1, 1 + num_sym]; rows depend only on their prefix
            kl = kl_true_vs_model(true, logits[r, : len(s) + 1][:, cols].astype(np.float64), epsilon=epsilon)
            per_string.append(float(kl.mean()))
            pooled_sum += float(kl.sum())
            pooled_n += kl.size
    if not per_string:  # e.g. no accepted generation to score: keep the keys, NaN values
        mean = pooled = worst = math.nan
    else:
        mean, pooled, worst = float(np.mean(per_string)), pooled_sum / pooled_n, float(np.max(per_string))
    return {
        prefix: mean,
        f"{prefix}_pooled": pooled,
        f"{prefix}_max": worst,
        f"num_{prefix}_strings": len(per_string),
        f"num_{prefix}_positions": pooled_n,
    }
