"""Reading the trainer's checkpoints: step directories `<step>/` holding the train state (`state`, a nested dict
with 'trainable' and 'frozen' parameter groups, the optimizer state, step and rng) and the run's `config`.

The trees are written as nested plain dicts keyed by path names (readable, mesh-free); `to_nested_dict` /
`from_nested_dict` convert between them and the in-memory trees. Readers never touch the optimizer state.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from leo_jax.models.registry import abstract_model
from leo_jax.sharding import build_mesh, tree_shardings

PARAM_GROUPS = ("trainable", "frozen")  # the train state's subtrees that hold the model's variables


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
    """The tree as nested plain dicts keyed by its path names (what is written to disk)."""
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


def _absolute(path) -> epath.Path:
    return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def find_checkpoint(path: str) -> tuple[epath.Path, int]:
    """(step directory, step) of the newest complete checkpoint under `path`: a training workdir, its
    checkpoints/ directory, or one step directory."""
    path = _absolute(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path {path} does not exist (give a training workdir, its checkpoints/ "
                                "directory or one step directory)")
    is_step = lambda d: d.name.isdigit() and (d / "state").is_dir() and (d / "config").is_dir()  # noqa: E731
    if is_step(path):
        return path, int(path.name)
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((d for d in directory.iterdir() if is_step(d)), key=lambda d: int(d.name))
    if not steps:  # (in-progress Orbax saves are '<step>.orbax-checkpoint-tmp-*' and never count)
        raise FileNotFoundError(f"no checkpoints found in {directory}: expected step directories <step>/ holding "
                                "'state' and 'config', as `python -m leo_jax.train --workdir DIR` writes under "
                                "DIR/checkpoints/")
    return steps[-1], int(steps[-1].name)


def load_trained(path: str, dtype: Any = None, mesh: jax.sharding.Mesh | None = None
                 ) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """(model, config) from the newest checkpoint under `path` (see `find_checkpoint`).

    The model is rebuilt abstractly from the checkpoint's own config and only its variables are read: Orbax's
    partial restore of the 'trainable' and 'frozen' subtrees of the saved train state; the optimizer state is never
    read. Floating-point values are cast to `dtype` when given (e.g. 'bfloat16' for inference). Arrays are placed by
    their logical axes on `mesh` (default: the first device)."""
    try:
        dtype = None if dtype is None else jax.numpy.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"dtype {dtype!r} is not a dtype name (e.g. 'bfloat16', 'float32')") from e
    step_dir, step = find_checkpoint(path)
    config = ml_collections.ConfigDict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "config"))
    if "model" not in config:
        raise ValueError(f"{step_dir / 'config'}: the saved config has no `model` section")
    graphdef, abstract = nnx.split(abstract_model(config.model, where=f"{step_dir}/config: model"))
    if mesh is None:
        mesh = build_mesh(devices=jax.devices()[:1])
    shardings = tree_shardings(abstract, mesh)
    saved = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state").tree
    paths, leaves, _ = tree_paths(abstract)
    sharding_leaves = jax.tree.leaves(shardings)
    target: dict = {group: {} for group in PARAM_GROUPS}
    for names, leaf, sharding in zip(paths, leaves, sharding_leaves):
        group = next((g for g in PARAM_GROUPS if _lookup(saved.get(g, {}), names) is not None), None)
        if group is None:
            raise ValueError(f"checkpoint {step_dir} has no value for model variable {'/'.join(names)} (neither "
                             "under 'trainable' nor 'frozen' of its train state); was it written by another model?")
        stored = _lookup(saved[group], names)
        if tuple(stored.shape) != tuple(leaf.shape):
            raise ValueError(f"checkpoint {step_dir}: {'/'.join(names)} has shape {tuple(stored.shape)}, the model "
                             f"built from its config expects {tuple(leaf.shape)}")
        cast = dtype is not None and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)
        node = target[group]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = jax.ShapeDtypeStruct(leaf.shape, dtype if cast else leaf.dtype, sharding=sharding)
    restored = ocp.PyTreeCheckpointer().restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    values = _merge(restored.get("trainable", {}), restored.get("frozen", {}))
    state = from_nested_dict(values, abstract)
    logging.getLogger(__name__).info("loaded step %d from %s", step, step_dir)
    return nnx.merge(graphdef, state), config


def load_training_params(step_dir: str | os.PathLike, prefix: str = "") -> dict[str, np.ndarray]:
    """{path inside `prefix`: host array} of the parameters (trainable and frozen) in one trainer checkpoint step
    ('' = all of them): what `config.train.init` reads when a stage starts from an earlier stage's step."""
    step_dir = Path(step_dir)
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
        args = {group: jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree[group])
                for group in PARAM_GROUPS}
        restored = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
            item={group: tree[group] for group in args}, restore_args=args, partial_restore=True))
    out = {}
    for group in PARAM_GROUPS:
        for keys, array in jax.tree_util.tree_flatten_with_path(restored[group])[0]:
            name = "/".join(str(k.key) for k in keys)
            if not prefix or name.startswith(prefix + "/"):
                out[name[len(prefix) + 1:] if prefix else name] = array
    return out


def _lookup(tree: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        if not isinstance(tree, dict) or name not in tree:
            return None
        tree = tree[name]
    return tree


def _merge(a: dict, b: dict) -> dict:
    """Union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if key in out and isinstance(value, dict) else value
    return out
