"""Mano evaluation: accuracy of the answer token for expressions with exactly L operations (docs/tasks.md).

The answer is one token, so greedy generation is correct iff the argmax of the teacher-forced logits at the "="
position is the true value.
"""

from __future__ import annotations

from canon_jax.eval import common

_OPS = {
    0: lambda a, b, m: (a + b) % m,
    1: lambda a, b, m: (a - b) % m,
    2: lambda a, b, m: (a * b) % m,
    3: lambda a, b, m: (a * pow(b, m - 2, m)) % m,
}


def evaluate_prefix(task, tokens) -> tuple[int, int]:
    """Reference evaluator of a Mano sample's expression: (value mod `mod`, number of operations). Works on the
    official ids (values 5000+v, op ids 1-8) so it shares nothing with the generator."""
    off = task.to_official(tokens)
    mod = task.params["mod"]
    expr = off[2:-2]  # drop BOS, length token, '=' token and answer
    pos, n_ops = 0, 0

    def rec():
        nonlocal pos, n_ops
        t = expr[pos]
        pos += 1
        if t >= 5000:
            return t - 5000
        n_ops += 1
        a = rec()
        b = rec()
        return _OPS[(t - 1) % 4](a, b, mod)

    v = rec()
    if pos != len(expr):
        raise ValueError("trailing tokens after the expression")
    return v, n_ops


def evaluate_mano(task, *, logits_fn, num_samples: int, batch_size: int, seed: int = 0, **_) -> dict:
    if logits_fn is None:
        raise ValueError(f"{task.name} evaluation needs logits_fn")
    samples = [task.sample(i, "test", seed) for i in range(num_samples)]
    preds = common.teacher_forced(logits_fn, [s.tokens for s in samples], batch_size)
    ok = [int(am[len(s) - 2]) == int(s.tokens[-1]) for s, (am, _) in zip(samples, preds)]
    return {"accuracy": common.mean(ok), "count": len(ok), "L": task.params["L"], "chance": 1.0 / task.params["mod"]}
