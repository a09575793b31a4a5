"""Checkpointing with orbax ``CheckpointManager``.

One checkpoint = one step directory holding three items:

* ``state``: the train state pytree (``step``, ``params``, ``opt_state``), saved asynchronously; restored against an
  abstract target carrying the *current* mesh's shardings, so a run can resume on a different mesh / device count;
* ``data``: the data iterator's state (grain ``get_state()``, one JSON file per process via grain's orbax handler);
* ``config``: the experiment config (JSON), for provenance.

Orbax writes into a temporary directory and renames it when complete, so a half-written (killed) save never looks
like a checkpoint. At restore, two kinds of failure are kept apart:

* **mismatch** — the checkpoint's recorded tree (names, shapes, dtypes; read from its metadata, no array is loaded)
  differs from the state the current config builds: :class:`CheckpointMismatch`, a config error; nothing is touched;
* **storage damage** — the metadata is unreadable or loading the arrays / data state fails: the step directory is moved
  aside into ``damaged_checkpoints/`` next to ``checkpoints/`` (never deleted) and the previous step is tried; the
  moved step is saved again when training passes it. :attr:`Checkpointer.damaged` lists what was moved, for the
  caller to announce.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import grain
import jax
import orbax.checkpoint as ocp

from canon_jax.train.config import ConfigError

__all__ = ["Checkpointer", "CheckpointMismatch", "Damaged", "abstract_with_shardings"]

log = logging.getLogger(__name__)


class _IteratorState:
    """Adapter between a JSON-able iterator state snapshot and grain's orbax handler (which stores bytes)."""

    def __init__(self, state=None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, raw: bytes):
        self.state = json.loads(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)

    def start_prefetch(self):  # called by grain's handler after set_state
        pass


class CheckpointMismatch(ConfigError):
    """A readable checkpoint whose tree does not fit the state the current config builds (not storage damage)."""


@dataclasses.dataclass
class Damaged:
    """A checkpoint step found damaged at restore and moved aside."""

    step: int
    reason: str
    moved_to: pathlib.Path


def _is_closed_loop_leftover(unraisable) -> bool:
    exc = unraisable.exc_value
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _quiet_closed_loop_leftovers():
    """When orbax's restore of a damaged checkpoint fails, the array reads still in flight finish later and try to
    report to the restore's event loop, which is closed by then: Python prints one "Event loop is closed" traceback
    per read (hundreds for a real model). They carry no information beyond the failure already reported, so this
    process drops exactly those (every other unraisable exception still goes to the previous hook)."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_canon_quiet", False):
        return

    def hook(unraisable):
        if not _is_closed_loop_leftover(unraisable):
            previous(unraisable)

    hook._canon_quiet = True
    sys.unraisablehook = hook


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaf_specs(tree) -> dict:
    """``"a.b.0.c" -> (shape, dtype)`` for every array leaf (orbax metadata and abstract targets alike)."""
    return {
        ".".join(_key_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def abstract_with_shardings(abstract_tree, shardings):
    """``ShapeDtypeStruct`` leaves that carry the target shardings (what orbax restores into)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


class Checkpointer:
    """Thin wrapper around ``ocp.CheckpointManager`` (keep-last-K, async saves every ``every`` steps).

    Args:
      directory: where step directories are written (``<workdir>/checkpoints``).
      every: save interval in steps (``save(..., force=True)`` saves regardless).
      keep: number of most recent checkpoints kept.
      async_save: write arrays in a background thread while training continues.
    """

    def __init__(self, directory, every: int, keep: int, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self.every = every
        self.damaged: list[Damaged] = []
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_state, config: dict, force: bool = False) -> bool:
        """Save (asynchronously) if ``step`` is on the interval or ``force``; returns whether a save started."""
        if not force and not self.manager.should_save(step):
            return False
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorState(data_state)),
            config=ocp.args.JsonSave(config),
        )
        return self.manager.save(step, args=args, force=True)

    def restore(self, abstract_state):
        """Restore the newest undamaged checkpoint into ``abstract_state`` (ShapeDtypeStructs with shardings).

        Returns ``(step, state, data_state)`` or ``None`` when no usable checkpoint is left. Damaged steps are moved
        aside and recorded in :attr:`damaged`; a checkpoint that does not fit ``abstract_state`` raises
        :class:`CheckpointMismatch` (see the module doc).
        """
        self.damaged = []
        _quiet_closed_loop_leftovers()  # installed first: the leftovers can fire before orbax's error reaches us
        for step in reversed(self.all_steps()):
            try:
                meta = self.manager.item_metadata(step)["state"]
                if meta is None:
                    raise FileNotFoundError("no state metadata")
                saved = _leaf_specs(meta)
            except Exception as e:  # noqa: BLE001 - any failure to read the metadata is storage damage
                self._set_aside(step, e)
                continue
            self._check_fits(step, saved, _leaf_specs(abstract_state))
            other = self._other_process_count_data(step)
            try:
                if other is not None:  # written by a different number of processes (see below)
                    restored = self.manager.restore(
                        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                    )
                    return step, restored["state"], other
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(_IteratorState()),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - the tree fits (checked above): the files are damaged
                self._set_aside(step, e)
                continue
            return step, restored["state"], restored["data"].state
        return None

    def _check_fits(self, step, saved: dict, wanted: dict):
        if saved == wanted:
            return
        diffs = [f"{k}: missing in the checkpoint" for k in wanted if k not in saved]
        diffs += [f"{k}: not in this config's state" for k in saved if k not in wanted]
        diffs += [
            f"{k}: checkpoint {saved[k][0]} {saved[k][1]}, this config {wanted[k][0]} {wanted[k][1]}"
            for k in wanted
            if k in saved and saved[k] != wanted[k]
        ]
        more = f" (+{len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise CheckpointMismatch(
            f"checkpoint: step {step} in {self.directory} does not fit this config ({diffs[0]}{more}); resume with "
            f"the run's own config, or start a fresh run in a new --workdir"
        )

    def _set_aside(self, step: int, error: Exception):
        from canon_jax.train.workdir import set_aside

        text = str(error).splitlines()[0][:200] if str(error) else ""
        src = self.directory / str(step)
        dest = self.directory.parent / f"damaged_{self.directory.name}" / str(step)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"canon_jax_set_aside_{step}")
        if jax.process_index() == 0 and src.exists():
            dest = set_aside(src, dest.parent)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"canon_jax_set_aside_{step}_done")
        self.manager.reload()
        self.damaged.append(Damaged(step, f"{type(error).__name__}: {text}", dest))
        log.info("checkpoint at step %d is damaged (%s); moved to %s", step, text, dest)

    def _other_process_count_data(self, step):
        """The data-iterator state of a checkpoint written by a different number of processes, else ``None``.

        grain stores one ``process_<i>-of-<n>.json`` per process, so a run resumed with another process count finds
        no file of its own. The trainer's pipelines count *batches* per process (``{"next_index": k}``) and every
        process consumes the same number of global batches, so all files hold the same state and it is valid for
        any process count at the same global batch size; differing states are an error rather than a guess.
        """
        data_dir = self.directory / str(step) / "data"
        mine = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        files = sorted(data_dir.glob("process_*-of-*.json"))
        if mine.exists() or not files:
            return None
        states = {f.read_text() for f in files}
        if len(states) != 1:
            raise CheckpointMismatch(
                f"data iterator states of the {len(files)} writer processes differ ({sorted(states)}); "
                f"cannot resume this checkpoint with {jax.process_count()} process(es)"
            )
        log.info(
            "checkpoint at step %d was written by %d process(es); resuming its data position with %d",
            step,
            len(files),
            jax.process_count(),
        )
        return json.loads(states.pop())

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
