"""Depo evaluation: per-k accuracy of the k-hop answer word at n = N (docs/tasks.md).

A query is correct iff greedy decoding after the answer marker reproduces every token of the answer word.  Greedy
decoding conditions each step on the previously generated tokens, which (while correct) are exactly the true ones, so
"greedy output = answer word" ⇔ "argmax of the teacher-forced logits equals the true next token at every answer-word
position".  The evaluator uses that equivalence: one teacher-forced forward pass scores all ten queries of a sample.
(Word ends are marked by tokens > mini_vocab, so a greedy decoder stops exactly at the end of the answer word.)
"""

from __future__ import annotations

from collections import defaultdict

from canon_jax.data.base import ANSWER, BOS, NUM_SPECIAL
from canon_jax.eval import common


def parse_depo(task, tokens) -> tuple[dict, list[tuple[int, tuple, int, tuple]]]:
    """Reference parser: (successor map word -> word, [(k, query word, answer start position, answer word)])."""
    codes = task.to_codes(tokens).tolist()
    mv, K = task.params["mini_vocab"], task.params["K"]
    hop0 = NUM_SPECIAL + 2 * mv
    words_end = lambda c: NUM_SPECIAL + mv <= c < hop0  # noqa: E731
    pos = 1 if codes and codes[0] == BOS else 0
    succ: dict = {}
    edge_words, cur = [], []
    while pos < len(codes) and not hop0 <= codes[pos] < hop0 + K:
        c = codes[pos]
        if NUM_SPECIAL <= c < hop0:
            cur.append(c)
            if words_end(c):
                edge_words.append(tuple(cur))
                cur = []
        pos += 1
    for a, b in zip(edge_words[0::2], edge_words[1::2]):
        succ[a] = b
    queries = []
    while pos < len(codes):
        k = codes[pos] - hop0 + 1
        pos += 1
        q = []
        while codes[pos] != ANSWER:
            q.append(codes[pos])
            pos += 1
        pos += 1
        start, a = pos, []
        while pos < len(codes) and not hop0 <= codes[pos] < hop0 + K:
            a.append(codes[pos])
            pos += 1
        queries.append((k, tuple(q), start, tuple(a)))
    return succ, queries


def reference_answer(succ: dict, word: tuple, k: int) -> tuple:
    for _ in range(k):
        word = succ[word]
    return word


def evaluate_depo(task, *, logits_fn, num_samples: int, batch_size: int, seed: int = 0, **_) -> dict:
    if logits_fn is None:
        raise ValueError(f"{task.name} evaluation needs logits_fn")
    samples = [task.sample(i, "test", seed) for i in range(num_samples)]
    preds = common.teacher_forced(logits_fn, [s.tokens for s in samples], batch_size)
    correct: dict[int, list[bool]] = defaultdict(list)
    for s, (am, _) in zip(samples, preds):
        _, queries = parse_depo(task, s.tokens)
        for k, _, start, ans in queries:
            ok = all(int(am[start + j - 1]) == int(s.tokens[start + j]) for j in range(len(ans)))
            correct[k].append(ok)
    out = {"accuracy": common.mean(x for v in correct.values() for x in v)}
    for k in sorted(correct):
        out[f"accuracy_k{k}"] = common.mean(correct[k])
        out[f"count_k{k}"] = len(correct[k])
    return out
