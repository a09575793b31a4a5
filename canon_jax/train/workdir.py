"""The run directory: whether a path can hold a run, who may write it, and whether a new config may continue it.

* :func:`check_workdir_path` — a ``--workdir`` that is a file, sits under a file or is not writable is a
  :class:`ConfigError` before anything is written.
* :class:`WorkdirLock` — ``<workdir>/train.lock`` holds the owner's PID, host and start time; a second run on the same
  workdir is refused while the owner lives. A lock left by a dead process on this host is stale and taken over (with
  a message); a lock from another host cannot be checked and is only reported.
* :func:`recorded_config` / :func:`config_changes` — the config a run was trained with (saved with every checkpoint)
  against the one a re-run brings: changes to the model or the data alter the parameters' shapes or what the run
  means and are refused; optimizer, schedule, logging, evaluation, mesh and checkpoint settings may change (and are
  reported).
* :func:`set_aside` — move a file or directory to a fresh name (never deleting anything).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time

from canon_jax.train.config import ConfigError

__all__ = [
    "check_workdir_path",
    "WorkdirLock",
    "WorkdirBusy",
    "recorded_config",
    "config_changes",
    "set_aside",
    "format_change",
    "LOCK_NAME",
]

LOCK_NAME = "train.lock"

# Model fields that only choose how the same function is computed (numerics, memory, kernels): a resumed run may
# change them. Every other model field changes the parameters' shapes or the function itself.
RUNTIME_MODEL_KEYS = frozenset(
    {"dtype", "remat", "canon_recompute", "kernel_impl", "linear_chunk_size", "mamba_chunk_size", "max_seq_len"}
)
# Data fields that do not change the training stream, and the text runs' file locations: the same documents may move
# (another mount, another cluster), so a changed path is reported, not refused.
RUNTIME_DATA_KEYS = frozenset(
    {"num_workers", "text.eval_files", "text.eval_batches", "text.train_files", "text.tokenizer"}
)
# Outside model/data: the init seed only acts at step 0, so a resumed run would silently ignore a new one.
FIXED_KEYS = frozenset({"train.seed"})
# Optimizer transforms that exist only for a positive value: switching them on or off changes the optimizer state's
# structure, so the checkpoint's state would not fit.
STRUCTURAL_OPTIM_KEYS = ("optim.grad_clip", "optim.weight_decay")


class WorkdirBusy(RuntimeError):
    """Another live run holds the workdir's lock; the message names its PID, host and start time."""


def check_workdir_path(workdir) -> pathlib.Path:
    """Raise :class:`ConfigError` (key ``--workdir``) if ``workdir`` cannot be a run directory; returns it."""
    p = pathlib.Path(workdir)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--workdir: {p} exists and is not a directory")
    parent = p
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent != p and not parent.is_dir():
        raise ConfigError(f"--workdir: {p} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir: no permission to write in {parent}")
    return p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """``<workdir>/train.lock``: ``{"pid", "host", "started"}`` written with ``O_EXCL``; see the module doc."""

    def __init__(self, workdir):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self.held = False

    def _read(self):
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> str | None:
        """Take the lock; returns a message when a stale lock was taken over. Raises :class:`WorkdirBusy`."""
        note = None
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError as exists:
                owner = self._read()
                if owner is None:  # being written right now, or garbage: look again before judging it
                    time.sleep(0.2)
                    owner = self._read()
                if owner is not None and (owner.get("host") != self.me["host"] or _alive(owner["pid"])):
                    where = "this host" if owner.get("host") == self.me["host"] else f"host {owner.get('host')}"
                    raise WorkdirBusy(
                        f"workdir {self.path.parent} is in use by PID {owner['pid']} on {where} (since "
                        f"{owner.get('started', '?')}); wait for that run to end or use another --workdir (if that "
                        f"process is gone, delete {self.path})"
                    ) from exists
                # stale: the owner died on this host (or left an unreadable file). Move it aside under a name only
                # this process uses, so two runs taking over the same stale lock cannot both succeed.
                grave = self.path.with_name(f"{LOCK_NAME}.stale-{self.me['pid']}")
                try:
                    os.replace(self.path, grave)
                except FileNotFoundError:
                    continue
                if self._read_file(grave) != owner:  # someone else's fresh lock: put it back and look again
                    os.replace(grave, self.path)
                    continue
                grave.unlink()
                note = (
                    f"took over a stale lock of PID {owner['pid']} (no longer running) in {self.path.parent}"
                    if owner
                    else f"replaced an unreadable lock file {self.path}"
                )
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            return note
        raise WorkdirBusy(f"could not take the lock {self.path} (it keeps changing hands)")

    @staticmethod
    def _read_file(path):
        try:
            owner = json.loads(pathlib.Path(path).read_text())
            return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def release(self):
        if self.held and self._read() == self.me:
            self.path.unlink()
        self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


# ----------------------------------------------------------------------------------------------------------------------
def recorded_config(workdir) -> dict | None:
    """The config saved with the newest checkpoint whose config item is readable, else ``workdir/config.json``."""
    root = pathlib.Path(workdir)
    ckpt = root / "checkpoints"
    steps = sorted((int(p.name) for p in ckpt.iterdir() if p.name.isdigit()), reverse=True) if ckpt.is_dir() else []
    for path in [ckpt / str(s) / "config" / "metadata" for s in steps] + [root / "config.json"]:
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict):
            return cfg
    return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fixed(key: str) -> bool:
    section, _, rest = key.partition(".")
    if section == "model":
        return rest not in RUNTIME_MODEL_KEYS
    if section == "data":
        return rest not in RUNTIME_DATA_KEYS
    return key in FIXED_KEYS


def config_changes(old: dict, new: dict) -> tuple[list, list]:
    """``(refused, allowed)``: lists of ``(dotted key, old value, new value)`` between a run's recorded config and a
    new one. Keys present on one side only (a field added to the code since) are not compared."""
    a, b = _flatten(old), _flatten(new)
    refused, allowed = [], []
    for key in sorted(set(a) & set(b)):
        if a[key] == b[key]:
            continue
        change = (key, a[key], b[key])
        switched = key in STRUCTURAL_OPTIM_KEYS and ((a[key] or 0) > 0) != ((b[key] or 0) > 0)
        if _fixed(key) or switched:
            refused.append(change)
        else:
            allowed.append(change)
    return refused, allowed


def format_change(change) -> str:
    key, old, new = change
    return f"{key}: {json.dumps(old)} -> {json.dumps(new)}"


def set_aside(path, into) -> pathlib.Path:
    """Move ``path`` into the directory ``into`` under its own name (``name.1``, ``name.2`` ... if taken)."""
    path, into = pathlib.Path(path), pathlib.Path(into)
    into.mkdir(parents=True, exist_ok=True)
    dest, i = into / path.name, 0
    while dest.exists():
        i += 1
        dest = into / f"{path.name}.{i}"
    os.replace(path, dest)
    return dest
