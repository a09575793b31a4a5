"""Scoring and generation for language-model benchmarks, independent of lm-evaluation-harness.

:class:`CanonLM` holds a ``CausalLM`` (any architecture), its params and a Hugging Face ``tokenizers`` tokenizer, and
answers the three request types lm-evaluation-harness uses (the adapter in :mod:`canon_jax.eval.lm_eval_model` only
translates requests):

* :meth:`CanonLM.loglikelihood_tokens` -- ``log p(continuation | context)`` and whether greedy decoding would produce
  the continuation. Requests are sorted by length and scored in batches: right-padded to a power-of-two length (few
  compilations; a causal model's outputs at real positions do not depend on right padding), one jitted forward,
  float32 log-softmax. Inputs longer than ``max_length`` keep their last ``max_length`` tokens.
* :meth:`CanonLM.rolling_loglikelihood_tokens` -- the log-likelihood of a whole text after the prefix token, in
  blocks of ``max_length`` predictions, each block with the longest available context (the harness's convention).
* :meth:`CanonLM.generate_until` -- left-padded prompts through :func:`canon_jax.generate.generate` (one prefill and a
  scan with the model's own KV caches / recurrent and Canon states), greedy or sampled; the text is cut at the first
  stop string.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CanonLM", "rolling_windows"]


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """``(context, continuation)`` pairs whose continuations tile ``tokens`` in order; ``prefix + tokens`` is the
    sequence, every block predicts at most ``max_length`` tokens from the longest context that fits."""
    seq = [prefix] + list(tokens)
    out = []
    a = 1
    while a < len(seq):
        b = min(a + max_length, len(seq))
        lo = max(0, b - 1 - max_length)
        out.append((seq[lo:a], seq[a:b]))
        a = b
    return out


class CanonLM:
    """Benchmark scoring for a canon-jax model.

    Args:
      model: a ``CausalLM``; params: its params (boxed or plain).
      tokenizer: a ``tokenizers.Tokenizer`` (documents were ``[BOS] + text + [EOS]`` in training).
      batch_size: requests per forward / generation call.
      max_length: longest input (default ``model.config.max_seq_len``).
      bos_token / eos_token: names of the special tokens (default: detected as in the text pipeline).
    """

    def __init__(
        self,
        model,
        params,
        tokenizer,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        from canon_jax.train.text_data import _BOS_NAMES, _EOS_NAMES, _special_id

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.params, self.tokenizer = model, nn.unbox(params), tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.config.max_seq_len)
        if not 1 <= self.max_length <= model.config.max_seq_len:
            raise ValueError(
                f"max_length must be in [1, model.config.max_seq_len={model.config.max_seq_len}], got {max_length}"
            )
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab} tokens, more than the model's vocab_size {model.config.vocab_size}"
            )
        self.eos_id = _special_id(tokenizer, eos_token, _EOS_NAMES, "eos")
        try:
            self.bos_id = _special_id(tokenizer, bos_token, _BOS_NAMES, "bos")
        except ValueError:
            if bos_token is not None:
                raise
            self.bos_id = self.eos_id  # the harness's convention: EOS as the prefix when there is no BOS
        self._forward = jax.jit(self._logprobs)

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, hf_dir, tokenizer=None, **kwargs) -> CanonLM:
        """A LlamaCanon Hugging Face directory (``config.json`` + safetensors; ``tokenizer.json`` unless given)."""
        from canon_jax.interop import load_hf_checkpoint

        tok = _tokenizer(tokenizer, pathlib.Path(hf_dir) / "tokenizer.json")  # before the (large) weights
        model, params = load_hf_checkpoint(str(hf_dir))
        return cls(model, params, tok, **kwargs)

    @classmethod
    def from_workdir(cls, workdir, tokenizer=None, step: int | None = None, **kwargs) -> CanonLM:
        """A canon-jax training directory: its ``config.json`` and newest (or ``step``) checkpoint; the tokenizer is
        the run's ``data.text.tokenizer`` (byte-level when unset) unless given."""
        from canon_jax.train.checkpoint import Checkpointer
        from canon_jax.train.config import config_from_dict
        from canon_jax.train.text_data import load_tokenizer
        from canon_jax.train.trainer import Trainer

        workdir = pathlib.Path(workdir)
        if not (workdir / "config.json").exists():
            raise FileNotFoundError(f"{workdir}: no config.json; not a canon-jax training directory")
        cfg = config_from_dict(json.loads((workdir / "config.json").read_text()))
        if tokenizer is None and cfg.data.kind != "text":
            raise ValueError(f"{workdir}: a {cfg.data.kind!r} run has no text tokenizer; pass tokenizer=")
        trainer = Trainer(cfg, devices=jax.devices()[:1])
        ckpt = Checkpointer(workdir / "checkpoints", every=1, keep=1 << 30, async_save=False)
        try:
            if step is not None:
                if step not in ckpt.all_steps():
                    raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; have {ckpt.all_steps()}")
                ckpt.all_steps = lambda: [step]  # restore exactly this one
            restored = ckpt.restore(trainer.restore_target())
        finally:
            ckpt.close()
        if restored is None:
            raise FileNotFoundError(f"{workdir}: no checkpoint found")
        params = jax.device_get(restored[1]["params"])
        tok = (
            load_tokenizer(tokenizer if tokenizer is not None else cfg.data.text.tokenizer)
            if not hasattr(tokenizer, "encode")
            else tokenizer
        )
        return cls(trainer.model, params, tok, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _logprobs(self, params, tokens, targets):
        logits = self.model.apply({"params": params}, tokens).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        tgt = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        greedy = jnp.argmax(logits, axis=-1) == targets
        return tgt, greedy

    def loglikelihood_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), greedy?)`` per ``(context_ids, continuation_ids)`` request."""
        full, n_cont = [], []
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {i}: empty continuation")
            if not ctx:
                raise ValueError(f"request {i}: empty context (use the prefix/BOS token)")
            if len(cont) > self.max_length:
                raise ValueError(
                    f"request {i}: continuation of {len(cont)} tokens exceeds max_length {self.max_length}"
                )
            seq = list(ctx) + list(cont)
            full.append(seq[-(self.max_length + 1) :])
            n_cont.append(len(cont))
        order = sorted(range(len(full)), key=lambda i: -len(full[i]))
        out: list = [None] * len(full)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            width = min(_bucket(max(len(full[i]) - 1 for i in idx)), self.max_length)
            toks = np.zeros((self.batch_size, width), np.int32)  # fixed batch: one compilation per width
            tgts = np.zeros((self.batch_size, width), np.int32)
            for r, i in enumerate(idx):
                n = len(full[i]) - 1
                toks[r, :n] = full[i][:-1]
                tgts[r, :n] = full[i][1:]
            lp, gr = jax.device_get(self._forward(self.params, jnp.asarray(toks), jnp.asarray(tgts)))
            for r, i in enumerate(idx):
                n, k = len(full[i]) - 1, n_cont[i]
                out[i] = (float(np.sum(lp[r, n - k : n], dtype=np.float64)), bool(np.all(gr[r, n - k : n])))
        return out

    def rolling_loglikelihood_tokens(self, docs: Sequence[Sequence[int]]) -> list[float]:
        """Log-likelihood of each whole token sequence after the prefix (BOS) token."""
        pairs, owner = [], []
        for d, toks in enumerate(docs):
            for w in rolling_windows(toks, self.bos_id, self.max_length):
                pairs.append(w)
                owner.append(d)
        scores = self.loglikelihood_tokens(pairs)
        total = [0.0] * len(docs)
        for d, (lp, _) in zip(owner, scores):
            total[d] += lp
        return total

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Text requests: the context's trailing whitespace moves to the continuation; an empty context is BOS."""
        pairs = []
        for ctx, cont in requests:
            if not ctx:
                pairs.append(([self.bos_id], self.encode(cont)))
                continue
            n_sp = len(ctx) - len(ctx.rstrip())
            if n_sp:
                ctx, cont = ctx[:-n_sp], ctx[-n_sp:] + cont
            whole, c = self.encode(ctx + cont), self.encode(ctx)
            pairs.append((c, whole[len(c) :]))
        return self.loglikelihood_tokens(pairs)

    def generate_until(
        self,
        contexts: Sequence[str],
        until: Sequence[str] = (),
        max_gen_toks: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        """Continuations of ``contexts`` cut before the first of ``until`` (and at EOS)."""
        from canon_jax.generate import generate

        if max_gen_toks < 1 or max_gen_toks >= self.max_length:
            raise ValueError(f"max_gen_toks must be in [1, max_length={self.max_length}), got {max_gen_toks}")
        budget = self.max_length - max_gen_toks
        enc = [(self.encode(c) or [self.bos_id])[-budget:] for c in contexts]
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
        out: list = [None] * len(enc)
        rng = jax.random.key(seed)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            width = min(_bucket(max(len(enc[i]) for i in idx)), budget)
            prompts = np.zeros((self.batch_size, width), np.int32)
            mask = np.zeros((self.batch_size, width), bool)
            mask[:, -1] = True  # unused rows: a one-token prompt
            for r, i in enumerate(idx):  # left padding
                prompts[r, width - len(enc[i]) :] = enc[i]
                mask[r, width - len(enc[i]) :] = True
            rng, sub = jax.random.split(rng)
            toks = np.asarray(
                generate(
                    self.model,
                    self.params,
                    prompts,
                    int(max_gen_toks),
                    temperature=temperature,
                    rng=sub,
                    prompt_mask=mask,
                )
            )
            for r, i in enumerate(idx):
                ids = toks[r].tolist()
                if self.eos_id in ids:
                    ids = ids[: ids.index(self.eos_id)]
                text = self.decode(ids)
                cut = min((text.find(u) for u in until if u and u in text), default=len(text))
                out[i] = text[:cut]
        return out


def _tokenizer(tokenizer, default_path: pathlib.Path):
    from canon_jax.train.text_data import load_tokenizer

    if hasattr(tokenizer, "encode"):
        return tokenizer
    if tokenizer is None:
        if not default_path.exists():
            raise FileNotFoundError(f"{default_path.parent}: no tokenizer.json; pass tokenizer=PATH")
        tokenizer = default_path
    return load_tokenizer(str(tokenizer))
