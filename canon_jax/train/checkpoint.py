"""Checkpointing with orbax ``CheckpointManager``.

One checkpoint = one step directory holding three items:

* ``state``: the train state pytree (``step``, ``params``, ``opt_state``), saved asynchronously; restored against an
  abstract target carrying the *current* mesh's shardings, so a run can resume on a different mesh / device count;
* ``data``: the data iterator's state (grain ``get_state()``, one JSON file per process via grain's orbax handler);
* ``config``: the experiment config (JSON), for provenance.

Orbax writes into a temporary directory and renames it when complete, so a half-written (killed) save never looks
like a checkpoint; a checkpoint whose files are damaged afterwards is skipped at restore with a warning in favour of
the previous one.
"""
from __future__ import annotations

import json
import logging
import pathlib
import warnings

import grain
import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "abstract_with_shardings"]

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
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

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
        """Restore the newest readable checkpoint into ``abstract_state`` (ShapeDtypeStructs with shardings).

        Returns ``(step, state, data_state)`` or ``None`` when there is no checkpoint. A checkpoint that fails to
        load is skipped with a warning and the previous one is tried.
        """
        for step in reversed(self.all_steps()):
            try:
                other = self._other_process_count_data(step)
                if other is not None:  # written by a different number of processes (see below)
                    restored = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state)))
                    return step, restored["state"], other
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(_IteratorState())))
            except Exception as e:  # damaged or partial: fall back to the previous step
                msg = (f"checkpoint at step {step} in {self.directory} is unreadable "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); trying the previous one")
                log.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                continue
            return step, restored["state"], restored["data"].state
        return None

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
            raise ValueError(f"data iterator states of the {len(files)} writer processes differ ({sorted(states)}); "
                             f"cannot resume this checkpoint with {jax.process_count()} process(es)")
        log.info("checkpoint at step %d was written by %d process(es); resuming its data position with %d",
                 step, len(files), jax.process_count())
        return json.loads(states.pop())

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
