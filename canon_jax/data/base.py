"""The task registry and the names shared by every task.

:data:`TASK_NAMES` lists the tasks; :func:`get_task` builds one with the official defaults overridden by keyword. The
task base class, the sample record and the special tokens live in :mod:`canon_jax.data.task` (which the task modules
import) and are re-exported here, so ``canon_jax.data.base`` is the one module the rest of the package imports.
The id layout (local codes, vocabulary offsets, official ids) is described in :mod:`canon_jax.data.task`.
"""

from __future__ import annotations

from typing import Any

from canon_jax.data.brevo import Brevo
from canon_jax.data.capo import Capo
from canon_jax.data.depo import Depo
from canon_jax.data.lano import Lano
from canon_jax.data.mano import Mano
from canon_jax.data.task import (
    ANSWER,
    BOS,
    EOS,
    NUM_SPECIAL,
    PAD,
    QUERY,
    SEP,
    SPECIAL_NAMES,
    SPLITS,
    Sample,
    Task,
)

__all__ = [
    "ANSWER",
    "BOS",
    "EOS",
    "NUM_SPECIAL",
    "PAD",
    "QUERY",
    "SEP",
    "SPECIAL_NAMES",
    "SPLITS",
    "TASK_NAMES",
    "Sample",
    "Task",
    "get_task",
    "task_class",
    "task_defaults",
]

_REGISTRY: dict[str, tuple[type[Task], dict]] = {
    # name: (class, preset overrides of the class defaults)
    "depo1": (Depo, {}),
    "depo2": (Depo, {"N": 125, "K": 16, "mini_vocab": 3, "min_len": 5, "max_len": 7}),
    "brevo1": (Brevo, {}),
    "brevo2": (Brevo, {"N": 50, "multi_token": True}),
    "capo": (Capo, {}),
    "mano": (Mano, {}),
    "lano": (Lano, {}),
}
TASK_NAMES = tuple(_REGISTRY)


def task_class(name: str) -> type[Task]:
    """The class implementing task ``name``; a ``ValueError`` lists the valid names."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid tasks: {list(TASK_NAMES)}")
    return _REGISTRY[name][0]


def get_task(name: str, *, offset: int | None = None, **params: Any) -> Task:
    """The task ``name`` (one of :data:`TASK_NAMES`) with official defaults overridden by ``params``.

    ``offset`` places the task's own tokens in a shared vocabulary (default: right after the special tokens).
    """
    cls = task_class(name)
    preset = dict(_REGISTRY[name][1])
    unknown = sorted(set(params) - set(cls.DEFAULTS))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for task {name!r}; valid parameters: {sorted(cls.DEFAULTS)}")
    preset.update(params)
    return cls(offset=offset, task_name=name, **preset)


def task_defaults(name: str) -> dict:
    cls = task_class(name)
    d = dict(cls.DEFAULTS)
    d.update(_REGISTRY[name][1])
    return d
