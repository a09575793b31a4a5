"""The shared vocabulary of a task mix (docs/tasks.md, "Vocabulary").

Global ids: ``0..NUM_SPECIAL-1`` are the special tokens shared by every task (PAD=0, BOS=1, EOS=2, ANSWER=3, QUERY=4,
SEP=5); then each task of the mix gets a contiguous block for its own tokens, in the order the mix lists them.  A task
listed twice with identical parameters shares one block.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from canon_jax.data import base


def _spec(t) -> tuple[str, dict]:
    if isinstance(t, str):
        return t, {}
    if isinstance(t, Mapping):
        return t["name"], dict(t.get("params") or {})
    if hasattr(t, "name") and hasattr(t, "params"):
        return t.name, dict(t.params or {})
    name, params = t
    return name, dict(params or {})


class Vocabulary:
    """Places the tasks of a mix in one compact id space.

    tasks: iterable of task names, ``(name, params)`` pairs, ``{"name", "params"}`` dicts or ``TaskSpec``s.
    """

    def __init__(self, tasks: Iterable[Any]):
        self.tasks: list[base.Task] = []
        self._by_key: dict[tuple, base.Task] = {}
        offset = base.NUM_SPECIAL
        for t in tasks:
            name, params = _spec(t)
            probe = base.get_task(name, **params)
            key = (name, tuple(sorted(probe.params.items())))
            if key in self._by_key:
                self.tasks.append(self._by_key[key])
                continue
            task = base.get_task(name, offset=offset, **params)
            offset = task.vocab_end
            self._by_key[key] = task
            self.tasks.append(task)
        if not self.tasks:
            raise ValueError("a vocabulary needs at least one task")
        self.size = offset

    def task(self, name: str, **params) -> base.Task:
        """The placed task ``name`` with ``params`` (must be part of the mix)."""
        probe = base.get_task(name, **params)
        key = (name, tuple(sorted(probe.params.items())))
        if key not in self._by_key:
            raise ValueError(
                f"task {name!r} with params {params} is not part of this vocabulary; "
                f"it has {[k[0] for k in self._by_key]}"
            )
        return self._by_key[key]

    def __len__(self) -> int:
        return self.size

    def describe(self) -> str:
        lines = [f"0..{base.NUM_SPECIAL - 1}: specials {list(base.SPECIAL_NAMES)}"]
        for t in self._by_key.values():
            lines.append(f"{t.offset}..{t.vocab_end - 1}: {t.name} {t.params}")
        return "\n".join(lines) + f"\nvocab_size = {self.size}"


def vocab_size(tasks: Iterable[Any]) -> int:
    """Embedding rows needed by a mix of tasks (see :class:`Vocabulary`)."""
    return Vocabulary(tasks).size
