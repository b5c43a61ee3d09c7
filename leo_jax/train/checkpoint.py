"""One Orbax checkpoint per save: train state (trainable + frozen parameters, optimizer state, step, rng), the data
iterator's position (one JSON file for all processes, see `Trainer.data_state`) and the config, written
asynchronously.

Orbax writes each step into a temporary directory and renames it only once every item is complete (an atomic
finalize), so a process killed during a save leaves the previous checkpoint as the latest good one. Storage
problems surface in the caller's thread with the path and the OS cause: the directory is probed for writing at
start, free space is checked before each save, and a failed background write is reported at the next save, log or
wait, its partial temporary directory removed. Checkpoints that must not be resumed from (newer than a chosen
`resume_step`, or unreadable) are moved aside to `checkpoints_set_aside/`, never deleted. Restoring
always goes through an abstract state carrying the TARGET shardings, so a checkpoint written on one mesh restores
onto any other mesh or device count. Reading back only the model (generation, evaluation, export, a later stage's
init) is leo_jax.checkpoints.training's job.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from leo_jax.checkpoints.training import from_nested_dict, to_nested_dict
from leo_jax.train.state import TrainState
from leo_jax.train.workdir import check_free_space, check_writable, storage_error

logger = logging.getLogger("leo_jax.train")




class CheckpointReadError(RuntimeError):
    """No usable checkpoint to resume from; the message names the directory and what to do."""


def _os_error(error: BaseException) -> OSError | None:
    """The first OSError in an exception's cause / context chain (Orbax wraps background write errors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class Checkpointer:
    """Orbax CheckpointManager for `workdir/checkpoints`, keeping the newest `keep` checkpoints."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True, primary: bool = True):
        # Orbax (tensorstore) needs absolute paths; remote ones (gs://...) already are
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        self.local = "://" not in str(directory)
        self.primary = primary
        if self.local:
            check_writable(str(self.directory), "the checkpoint directory")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving: int | None = None  # the step of a save that may still be in flight

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict | None, config_json: dict,
             *, force: bool = False) -> bool:
        """Starts writing checkpoint `step` (in the background when async); raises StorageError first when the
        previous write failed or the filesystem reports too little free space."""
        self.check_for_errors()
        if self.local:
            local_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) / jax.process_count()
            check_free_space(str(self.directory), int(local_bytes * 1.1) + 2**20, f"checkpoint {step}:")
        items = {"state": ocp.args.StandardSave(to_nested_dict(state)),
                 "config": ocp.args.JsonSave(config_json)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        try:
            started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:
            raise self._failed(step, e) from e
        if started:
            self._saving = step
        return started

    def _failed(self, step: int, error: BaseException) -> BaseException:
        """Removes the partial temporary directory of `step`; the StorageError to raise (or `error` itself when it
        is not a storage problem)."""
        if self.local and self.primary:
            for partial in glob.glob(os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp*")):
                shutil.rmtree(partial, ignore_errors=True)
        os_error = _os_error(error)
        if os_error is None:
            return error
        return storage_error(str(self.directory), os_error, f"writing checkpoint {step}: the checkpoint directory")

    def check_for_errors(self) -> None:
        """Raises (StorageError for storage problems) if a background write has failed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._failed(self._saving, e) from e

    def wait(self) -> None:
        """Blocks until the pending write is complete; a failed one raises, its partial directory removed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(self._saving, e) from e
        self._saving = None

    def saved_config(self, step: int) -> dict:
        """The config checkpoint `step` was written with."""
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(self.directory / str(step) / "config")

    def set_aside(self, steps: list[int], reason: str) -> None:
        """Moves the step directories to `checkpoints_set_aside/<step>-<reason>-<time>` next to the checkpoint
        directory (kept for inspection, invisible to resume and rotation)."""
        if self.primary and steps:
            aside = self.directory.parent / "checkpoints_set_aside"
            aside.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                target = aside / f"{step}-{reason}-{stamp}"
                (self.directory / str(step)).rename(target)
                logger.warning("moved checkpoint %s to %s (%s)", self.directory / str(step), target, reason)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("leo_jax checkpoints set aside")
        self.manager.reload()

    def restore(self, step: int, abstract_state: TrainState) -> TrainState:
        """The state at `step`, placed by the shardings in `abstract_state` (ShapeDtypeStructs)."""
        items = {"state": ocp.args.StandardRestore(to_nested_dict(abstract_state))}
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return from_nested_dict(restored["state"], abstract_state)

    def data_position(self, step: int) -> dict:
        """The data position checkpoint `step` was written with (see `Trainer.data_state`)."""
        data = self.directory / str(step) / "data"
        if not data.exists():
            raise FileNotFoundError(f"checkpoint {self.directory / str(step)} has no data-iterator state")
        if any(data.glob("process_*-of-*.json")):
            raise ValueError(f"checkpoint {self.directory / str(step)} holds a per-process data state from an "
                             "older leo_jax; resume it with that version, or start afresh")
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(data)

    def restore_usable(self, abstract_state: TrainState, *, with_data: bool, fallback: bool
                       ) -> tuple[int, TrainState, Any]:
        """(step, state, data position or None) of the newest checkpoint that reads back. An unreadable one is moved
        aside with a warning and the previous one tried (`fallback`), else CheckpointReadError names it and the way
        out."""
        while True:
            step = self.latest_step()
            if step is None:
                raise CheckpointReadError(f"no readable checkpoint left in {self.directory} (unreadable ones were "
                                          f"moved to {self.directory.parent / 'checkpoints_set_aside'}); restore "
                                          "one from a backup, or start afresh in an empty --workdir")
            try:
                data = self.data_position(step) if with_data else None
                return step, self.restore(step, abstract_state), data
            except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
                cause = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                if not fallback:
                    raise CheckpointReadError(
                        f"checkpoint {self.directory / str(step)} cannot be read ({cause}); move it away or set "
                        "--config.train.resume_step to an older step (or drop "
                        "--config.train.checkpoint_fallback=False to fall back automatically)") from None
                logger.warning("checkpoint %s cannot be read (%s); falling back to the previous one",
                               self.directory / str(step), cause)
                self.set_aside([step], "unreadable")

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.close()
