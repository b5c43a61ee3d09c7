"""One Orbax checkpoint per save: train state (trainable + frozen parameters, optimizer state, step, rng), the data
iterator's state (Grain's checkpoint handler, one file per process) and the config, written asynchronously.

Orbax writes each step into a temporary directory and renames it only once every item is complete (an atomic
finalize), so a process killed during a save leaves the previous checkpoint as the latest good one. Restoring
always goes through an abstract state carrying the TARGET shardings, so a checkpoint written on one mesh restores
onto any other mesh or device count.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from leo_jax.train.state import TrainState


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    raise TypeError(f"unsupported pytree key {key!r}")


def tree_paths(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    """(path of each leaf as strings, leaves, treedef); Variable '.value' steps are dropped from the names."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = []
    for path, _ in with_paths:
        names = tuple(_key_name(k) for k in path)
        if isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
            names = names[:-1]
        paths.append(names)
    return paths, [leaf for _, leaf in with_paths], treedef


def to_nested_dict(tree: Any) -> dict:
    """The tree as nested plain dicts keyed by its path names (what is written to disk: readable, mesh-free)."""
    paths, leaves, _ = tree_paths(tree)
    out: dict = {}
    for path, leaf in zip(paths, leaves):
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return out


def from_nested_dict(nested: dict, like: Any) -> Any:
    """Inverse of to_nested_dict, with the structure (and Variable metadata) of `like`."""
    paths, _, treedef = tree_paths(like)
    leaves = []
    for path in paths:
        node = nested
        for name in path:
            node = node[name]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class _IteratorSnapshot:
    """The data iterator's state frozen at save time (an async save must not read the iterator later)."""

    def __init__(self, iterator: grain.DatasetIterator):
        self._state = json.dumps(iterator.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Orbax CheckpointManager for `workdir/checkpoints`, keeping the newest `keep` checkpoints."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        # Orbax (tensorstore) needs absolute paths; remote ones (gs://...) already are
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_iterator: grain.DatasetIterator | None, config_json: dict,
             *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(to_nested_dict(state)),
                 "config": ocp.args.JsonSave(config_json)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: TrainState,
                data_iterator: grain.DatasetIterator | None = None) -> TrainState:
        """The state at `step`, placed by the shardings in `abstract_state` (ShapeDtypeStructs); the data iterator
        (if given) is set to its saved position in place."""
        items = {"state": ocp.args.StandardRestore(to_nested_dict(abstract_state))}
        if data_iterator is not None:
            if not (self.directory / str(step) / "data").exists():
                raise FileNotFoundError(f"checkpoint {self.directory / str(step)} has no data-iterator state")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return from_nested_dict(restored["state"], abstract_state)

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
