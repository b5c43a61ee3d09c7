"""Device mesh from config and the one table that maps logical axis names to mesh axes.

Model code only ever names *logical* axes ('embed', 'mlp', 'batch', ...). This module turns them into
`PartitionSpec`s for a concrete mesh, so the same model runs unchanged on 1 device, 8 fake CPU devices or a pod.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). The single source of truth.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("kernel_hw", None),
    ("patch", None),
    ("positions", None),
    ("experts", None),
    ("lora_rank", None),
    ("queries", None),
)
_RULES = dict(LOGICAL_RULES)


def logical_to_spec(axes: Sequence[str | None] | None, rules: Mapping[str, Any] | None = None) -> P:
    """PartitionSpec for a tuple of logical names; unknown names are an error so typos never go unsharded."""
    rules = _RULES if rules is None else rules
    if axes is None:
        return P()
    out, used = [], set()
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in leo_jax.sharding.LOGICAL_RULES")
        target = rules[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)  # a mesh axis may shard one dim only
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*out)


def fit_spec_to_shape(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from dims they do not divide (e.g. 2 KV heads on tensor=4), keeping the rest sharded."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept, size = [], 1
        for name in names:
            if dim % (size * mesh.shape[name]) == 0:
                kept.append(name)
                size *= mesh.shape[name]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def build_mesh(mesh_config: Mapping[str, Any] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh over (data, fsdp, tensor) from `{'ici': {axis: size}, 'dcn': {axis: size}}`.

    `ici` sizes are within a slice, `dcn` sizes across slices (multi-slice TPU). One `ici` size may be -1: the
    devices left over. Missing axes default to 1 (ici data defaults to -1, i.e. pure data parallel).
    """
    mesh_config = dict(mesh_config or {})
    devices = list(jax.devices() if devices is None else devices)
    ici = {"data": -1, "fsdp": 1, "tensor": 1, **dict(mesh_config.get("ici", {}))}
    dcn = {"data": 1, "fsdp": 1, "tensor": 1, **dict(mesh_config.get("dcn", {}))}
    for name in list(ici) + list(dcn):
        if name not in MESH_AXES:
            raise ValueError(f"config.mesh: unknown mesh axis {name!r}; known axes are {MESH_AXES}")
    num_slices = math.prod(dcn[a] for a in MESH_AXES)
    per_slice = len(devices) // num_slices
    if per_slice * num_slices != len(devices):
        raise ValueError(f"config.mesh.dcn: {num_slices} slices do not divide {len(devices)} devices")
    ici = _resolve_rest(ici, per_slice, "config.mesh.ici")
    shape = tuple(ici[a] for a in MESH_AXES)
    if num_slices == 1:
        array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    elif hasattr(devices[0], "slice_index"):
        array = mesh_utils.create_hybrid_device_mesh(shape, tuple(dcn[a] for a in MESH_AXES), devices)
    else:  # devices without slice information (CPU simulation): consecutive blocks of devices act as slices
        dcn_shape = tuple(dcn[a] for a in MESH_AXES)
        blocks = np.asarray(devices, dtype=object).reshape(dcn_shape + shape)
        n = len(MESH_AXES)
        array = blocks.transpose([i for pair in zip(range(n), range(n, 2 * n)) for i in pair]).reshape(
            tuple(d * s for d, s in zip(dcn_shape, shape)))
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_flag(text: str, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh of a command-line `--mesh` value: comma-separated `axis=size` over (data, fsdp, tensor), e.g.
    'fsdp=8' or 'data=2,tensor=4'; one size may be -1 (the devices left over), unnamed axes are 1. 'data:2/tensor:4'
    is the same, for option strings that reserve ',' and '=' (lmms-eval's model_args)."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.replace("/", ",").split(","))):
        name, _, size = part.replace(":", "=").partition("=")
        if name.strip() not in MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected comma-separated axis=size with axes {MESH_AXES}, e.g. "
                             "'fsdp=8' or 'data=2,tensor=4'")
        sizes[name.strip()] = int(size)
    devices = list(jax.devices() if devices is None else devices)
    if -1 not in sizes.values() and math.prod(sizes.values()) != len(devices):
        raise ValueError(f"--mesh {text!r} needs {math.prod(sizes.values())} devices, there are {len(devices)}")
    return build_mesh({"ici": sizes}, devices)


def _resolve_rest(sizes: dict[str, int], total: int, where: str) -> dict[str, int]:
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"{where}: only one axis may be -1, got {rest}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if total % known:
            raise ValueError(f"{where}: sizes {sizes} do not divide {total} devices")
        sizes[rest[0]] = total // known
    if math.prod(sizes.values()) != total:
        raise ValueError(f"{where}: sizes {sizes} multiply to {math.prod(sizes.values())}, "
                         f"but there are {total} devices")
    return sizes


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context (e.g. single-device eager use)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    spec = fit_spec_to_shape(logical_to_spec(axes), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def variable_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    return variable.get_metadata().get("axes")


def logical_specs(state: nnx.State) -> nnx.State:
    """The state's tree with every Variable replaced by the PartitionSpec of its logical axes (mesh-independent)."""
    return jax.tree.map(
        lambda v: logical_to_spec(variable_axes(v)), state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )


def tree_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings on `mesh` for a tree holding nnx Variables (sharded by their logical axes, fitted to each shape:
    parameters and the optimizer moments that mirror them) and plain arrays (replicated: step, rng, counters)."""

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            return NamedSharding(mesh, fit_spec_to_shape(logical_to_spec(variable_axes(leaf)),
                                                         leaf.get_value().shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_shards(mesh: Mesh) -> int:
    """The number of blocks the batch axis splits into on `mesh` (the devices that hold different rows)."""
    spec = logical_to_spec(("batch",))[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(mesh.shape[name] for name in names)


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-leading arrays: dim 0 over the batch axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def shard_module(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Places every Variable of `module` on `mesh` according to its logical axes (in place; returns module)."""
    state = nnx.state(module)
    shardings = tree_shardings(state, mesh)
    placed = jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s)), state, shardings,
                          is_leaf=lambda v: isinstance(v, nnx.Variable))
    nnx.update(module, placed)
    return module
