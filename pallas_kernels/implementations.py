"""The implementation names of the ops (one list, shared with ``ModelConfig``). Kept free of jax so that reading
and validating a config does not start jax (a config error stays one line on stderr)."""

from __future__ import annotations

# The implementation names an op's ``impl=`` takes (one list; ``ModelConfig.kernel_impl`` takes ``KERNEL_IMPLS``):
# "auto" (the target platform's best), "xla" (XLA only), "cpu" (the CPU path: the native XLA:CPU kernel of the conv;
# the chunked XLA form of the scans, which have no native kernel), "reference" (the scans' token-by-token lax.scan),
# "pallas" (the compiled Pallas kernel) and "pallas_interpret" (the Pallas kernel in the interpreter, any backend).
KERNEL_IMPLS = ("auto", "xla", "cpu", "pallas", "pallas_interpret")
_SCAN_IMPLS = KERNEL_IMPLS + ("reference",)
ATTENTION_IMPLS = ("auto", "xla", "splash", "splash_interpret", "cudnn")
IMPLEMENTATIONS = {
    "causal_conv1d": KERNEL_IMPLS,
    "gla": _SCAN_IMPLS,
    "gated_delta_rule": _SCAN_IMPLS,
    "ssd": _SCAN_IMPLS,
    "attention": ATTENTION_IMPLS,
}


def check_impl(op: str, impl, name: str = "impl") -> str:
    """``impl`` if ``op`` (a key of ``IMPLEMENTATIONS``) has an implementation of that name; else a ValueError naming
    the op, the argument (``name``) and the allowed names."""
    allowed = IMPLEMENTATIONS[op]
    if impl not in allowed:
        raise ValueError(f"{op}: unknown {name} {impl!r}; choose one of {allowed}")
    return impl
