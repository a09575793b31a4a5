"""Capo evaluation: attribute accuracy on the trained people and a bits-of-knowledge estimate (docs/tasks.md).

Each evaluated person's biography is rendered freshly (test seed) and scored teacher-forced.  For every attribute a
with value tokens v_1..v_m at known positions:

* ``first_token_accuracy[a]``: argmax at the position predicting v_1 equals v_1;
* ``value_accuracy[a]``: argmax equals v_j for every j (= greedy generation of the whole value is correct);
* ``loss_bits[a]``: mean over people of −Σ_j log2 p(v_j | prefix), the model's code length of the value.

Bits of knowledge (N = ``num_people``, |V_a| = number of distinct values of a; company1city is excluded from both sums
because it is a function of the company and carries no extra bits):

* ``bits_loss  = Σ_a N · max(0, log2|V_a| − loss_bits[a])`` — Part 3.3's bit-complexity form N·log2(|V|/e^loss)
  (loss in nats there), i.e. how many bits the model's predictions save over a uniform guess;
* ``bits_accuracy = Σ_a N · value_accuracy[a] · log2|V_a|`` — a cruder, accuracy-scaled variant.

``bits_per_param_*`` divide by ``num_params`` when given.  Estimates from ``num_samples`` < N people are scaled to N.

Pure-Python reference checker: :func:`check_attribute` (is a value, as words, the person's attribute in the people
table?) — the tests decode the model's greedy value tokens and compare it with the evaluator's per-attribute scores.
"""

from __future__ import annotations

import math

import numpy as np

from canon_jax.data.capo import attribute_values, tokenize
from canon_jax.eval import common

BIT_ATTRIBUTES = ("birthyear", "birthmonth", "birthday", "birthcity", "university", "field", "company1name")
ALL_ATTRIBUTES = BIT_ATTRIBUTES + ("company1city",)


def check_attribute(task, person: int, attribute: str, words) -> bool:
    """True iff ``words`` (a list of word strings, or one string) is exactly person ``person``'s ``attribute`` value
    in ``task``'s people table; anything else (other values, extra or missing words, non-strings) is False."""
    if attribute not in ALL_ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; valid attributes: {list(ALL_ATTRIBUTES)}")
    if isinstance(words, str):
        words = tokenize(words)
    try:
        return [str(w) for w in words] == tokenize(task.person(int(person))[attribute])
    except TypeError:
        return False


def value_sizes() -> dict[str, int]:
    return {a: len(attribute_values(a)) for a in ALL_ATTRIBUTES}


def evaluate_capo(
    task,
    *,
    logits_fn,
    num_samples: int | None = None,
    batch_size: int,
    seed: int = 0,
    num_params: int | None = None,
    **_,
) -> dict:
    if logits_fn is None:
        raise ValueError(f"{task.name} evaluation needs logits_fn")
    n_people = task.params["num_people"]
    num_samples = n_people if num_samples is None else min(num_samples, n_people)
    samples = [task.sample(i, "test", seed) for i in range(num_samples)]
    res = common.teacher_forced(logits_fn, [s.tokens for s in samples], batch_size, logprobs=True)
    first, whole, bits = ({a: [] for a in ALL_ATTRIBUTES} for _ in range(3))
    for s, (am, lp) in zip(samples, res):
        for a in ALL_ATTRIBUTES:
            b, e = s.meta["spans"][a]
            pred = am[b - 1 : e - 1]
            true = s.tokens[b:e]
            first[a].append(bool(pred[0] == true[0]))
            whole[a].append(bool(np.all(pred == true)))
            bits[a].append(float(-np.sum(lp[b - 1 : e - 1]) / math.log(2)))
    sizes = value_sizes()
    out: dict = {"num_people": n_people, "num_evaluated": num_samples}
    bits_loss = bits_acc = 0.0
    for a in ALL_ATTRIBUTES:
        out[f"first_token_accuracy/{a}"] = common.mean(first[a])
        out[f"value_accuracy/{a}"] = common.mean(whole[a])
        out[f"loss_bits/{a}"] = common.mean(bits[a])
        if a in BIT_ATTRIBUTES:
            h = math.log2(sizes[a])
            lb = out[f"loss_bits/{a}"]
            bits_loss += n_people * max(0.0, h - lb) if math.isfinite(lb) else 0.0
            bits_acc += n_people * out[f"value_accuracy/{a}"] * h
    out["value_accuracy"] = common.mean(out[f"value_accuracy/{a}"] for a in ALL_ATTRIBUTES)
    out["first_token_accuracy"] = common.mean(out[f"first_token_accuracy/{a}"] for a in ALL_ATTRIBUTES)
    out["bits_loss"], out["bits_accuracy"] = bits_loss, bits_acc
    out["bits_max"] = n_people * sum(math.log2(sizes[a]) for a in BIT_ATTRIBUTES)
    if num_params:
        out["bits_per_param_loss"] = bits_loss / num_params
        out["bits_per_param_accuracy"] = bits_acc / num_params
    return out
