"""Brevo evaluation: the generated answer must list exactly the query's ancestors plus the query, each node after all
of its parents (any valid topological order is accepted — there is no single reference), terminated by EOS
(docs/tasks.md).  Test samples have n = N.  Outputs with no EOS within the budget, unknown tokens, duplicated,
missing or extra nodes, or an order violation are wrong.
"""

from __future__ import annotations

import numpy as np

from canon_jax.data.base import ANSWER, BOS, EOS, NUM_SPECIAL, QUERY
from canon_jax.data.words import split_words
from canon_jax.eval import common


def _to_nodes(task, codes: list[int]):
    """Task codes -> node names (tuples of word values); None if malformed."""
    if any(c < NUM_SPECIAL or c >= NUM_SPECIAL + task.num_task_tokens() for c in codes):
        return None
    vals = [c - NUM_SPECIAL + 1 for c in codes]
    if not task.params["multi_token"]:
        return [(v,) for v in vals]
    words, complete = split_words(vals, task.params["mini_vocab"])
    return words if complete else None


def parse_prompt(task, tokens) -> tuple[dict, tuple]:
    """Reference parser of ``[BOS] edges [QUERY] q [ANSWER]...``: (parents: node -> set of parent nodes, query)."""
    codes = task.to_codes(tokens).tolist()
    if codes and codes[0] == BOS:
        codes = codes[1:]
    qpos = codes.index(QUERY)
    apos = codes.index(ANSWER)
    nodes = _to_nodes(task, codes[:qpos])
    query = _to_nodes(task, codes[qpos + 1 : apos])
    if nodes is None or query is None or len(nodes) % 2 or len(query) != 1:
        raise ValueError("malformed Brevo prompt")
    parents: dict = {}
    for p, c in zip(nodes[0::2], nodes[1::2]):
        parents.setdefault(c, set()).add(p)
        parents.setdefault(p, set())
    return parents, query[0]


def ancestors(parents: dict, query) -> set:
    seen, stack = {query}, [query]
    while stack:
        for p in parents.get(stack.pop(), ()):
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def check_answer(task, prompt_tokens, answer_tokens) -> bool:
    """True iff ``answer_tokens`` (generated after the answer marker) is a valid answer, ending with EOS."""
    parents, query = parse_prompt(task, prompt_tokens)
    codes = task.to_codes(np.asarray(answer_tokens)).tolist()
    if EOS not in codes:
        return False
    nodes = _to_nodes(task, codes[: codes.index(EOS)])
    if nodes is None:
        return False
    if len(set(nodes)) != len(nodes) or set(nodes) != ancestors(parents, query) or nodes[-1] != query:
        return False
    placed = set()
    for v in nodes:
        if not parents.get(v, set()) <= placed:
            return False
        placed.add(v)
    return True


def prompt_of(sample) -> np.ndarray:
    """Tokens up to and including the answer marker."""
    toks = np.asarray(sample.tokens)
    return toks[: int(np.nonzero(toks == ANSWER)[0][0]) + 1]


def max_answer_tokens(task) -> int:
    p = task.params
    return p["N"] * (p["max_len"] if p["multi_token"] else 1) + 1


def evaluate_brevo(task, *, generate_fn, num_samples: int, batch_size: int, seed: int = 0, **_) -> dict:
    if generate_fn is None:
        raise ValueError(f"{task.name} evaluation needs generate_fn")
    samples = [task.sample(i, "test", seed) for i in range(num_samples)]
    prompts = [prompt_of(s) for s in samples]
    outs = common.generate(generate_fn, prompts, batch_size, max_answer_tokens(task), seed)
    ok = [check_answer(task, p, o) for p, o in zip(prompts, outs)]
    return {
        "accuracy": common.mean(ok),
        "count": len(ok),
        "mean_answer_nodes": common.mean(s.meta["num_answer_nodes"] for s in samples),
    }
