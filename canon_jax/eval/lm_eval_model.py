"""lm-evaluation-harness model ``canon-jax`` (needs the ``eval`` extra: ``pip install -e .[eval]``).

    python -m canon_jax.eval.lm_eval_model run --model canon-jax --model_args workdir=runs/llama_1b --tasks hellaswag
    python -m canon_jax.eval.lm_eval_model run --model canon-jax --model_args hf_dir=ckpt/ --batch_size 16 --tasks ...

This entry point registers the model and hands the arguments to lm_eval's own command line (lm_eval discovers
third-party models only once their module is imported; from Python, ``import canon_jax.eval.lm_eval_model`` and
call ``lm_eval.simple_evaluate(model="canon-jax", model_args=...)`` or pass a :class:`CanonJaxLM` instance).

``model_args``: ``workdir`` (a canon-jax training directory; ``step`` picks a checkpoint) or ``hf_dir`` (a LlamaCanon
Hugging Face directory), ``tokenizer`` (a ``tokenizer.json``; default: the run's / the directory's), ``max_length``,
``bos_token``, ``eos_token``; the batch size is lm_eval's ``--batch_size`` (``auto`` means 8). The math lives in
:class:`canon_jax.eval.harness.CanonLM`.
"""

from __future__ import annotations

import copy

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from canon_jax.eval.harness import CanonLM

__all__ = ["CanonJaxLM", "main"]


class CanonJaxLM(TemplateLM):
    """lm_eval ``LM`` over :class:`~canon_jax.eval.harness.CanonLM` (loglikelihood, rolling, generate_until)."""

    def __init__(
        self,
        workdir=None,
        hf_dir=None,
        tokenizer=None,
        batch_size=8,
        max_length=None,
        step=None,
        bos_token=None,
        eos_token=None,
        lm: CanonLM | None = None,
        **unused,
    ):
        super().__init__()
        bad = sorted(k for k, v in unused.items() if v is not None and k not in ("device", "max_batch_size"))
        if bad:
            raise ValueError(
                f"canon-jax: unknown model_args {bad}; valid: workdir, hf_dir, tokenizer, batch_size, "
                "max_length, step, bos_token, eos_token"
            )
        if str(batch_size).startswith("auto"):
            batch_size = 8
        kw = dict(
            batch_size=int(batch_size),
            max_length=int(max_length) if max_length else None,
            bos_token=bos_token,
            eos_token=eos_token,
        )
        if lm is not None:
            self.lm = lm
        elif (workdir is None) == (hf_dir is None):
            raise ValueError("canon-jax: give exactly one of model_args workdir=... or hf_dir=...")
        elif workdir is not None:
            self.lm = CanonLM.from_workdir(workdir, tokenizer, step=int(step) if step is not None else None, **kw)
        else:
            self.lm = CanonLM.from_hf_dir(hf_dir, tokenizer, **kw)

    @property
    def eot_token_id(self):
        return self.lm.eos_id

    @property
    def prefix_token_id(self):
        return self.lm.bos_id

    @property
    def max_length(self):
        return self.lm.max_length

    @property
    def tokenizer_name(self) -> str:
        return "canon-jax"

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.lm.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.lm.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = self.lm.loglikelihood_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        docs = [self.tok_encode(req.args[0]) for req in tqdm(requests, disable=disable_tqdm, desc="rolling")]
        out = self.lm.rolling_loglikelihood_tokens(docs)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        groups: dict = {}
        for i, req in enumerate(requests):
            ctx, gen_kwargs = req.args
            kw = copy.deepcopy(gen_kwargs) if isinstance(gen_kwargs, dict) else {}
            until = kw.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            if isinstance(until, str):
                until = [until]
            max_gen = int(kw.pop("max_gen_toks", 256))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            kw.pop("top_p", None)
            kw.pop("top_k", None)
            if kw:
                raise ValueError(f"canon-jax generate_until: unsupported gen_kwargs {sorted(kw)}")
            max_gen = min(max_gen, self.max_length - 1)
            groups.setdefault((tuple(until), max_gen, temperature), []).append((i, ctx))
        out: list = [None] * len(requests)
        for (until, max_gen, temperature), items in groups.items():
            texts = self.lm.generate_until([c for _, c in items], until, max_gen, temperature)
            for (i, ctx), t in zip(items, texts):
                out[i] = t
                self.cache_hook.add_partial("generate_until", (ctx, requests[i].args[1]), t)
        return out


if __name__ != "__main__":  # registered once, by the importable module (``python -m`` imports it below)
    register_model("canon-jax", "canon_jax")(CanonJaxLM)


def main(argv=None) -> None:
    """lm_eval's command line with ``canon-jax`` registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    import canon_jax.eval.lm_eval_model  # noqa: F401  (registers canon-jax)

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
