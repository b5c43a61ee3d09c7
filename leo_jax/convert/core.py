"""Conversion engine: families, name-map rules and streaming safetensors I/O.

A family's conversion is data: a list of `Rule`s (HF tensor names <-> leo_jax parameter paths, with a transform
each way) plus config mappers. The same rules drive import and export, one tensor (one layer) at a time, so an 8B
model never needs two full copies in host memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from leo_jax.jsonfile import read_json, write_json
from leo_jax.layers.common import DTYPES

Array = np.ndarray


class ConversionError(ValueError):
    """A checkpoint does not fit the model: names the tensor/field and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensors `hf` <-> leo_jax params `jax` (paths joined by '/').

    With `layers`, '{i}' in the HF names is the HF layer index and the leo_jax params are stacked: slot s of the
    stack holds HF layer `layers[s]`. `to_jax(hf_arrays, jax_shapes)` and `to_hf(jax_arrays)` convert one layer.
    """

    hf: tuple[str, ...]
    jax: tuple[str, ...]
    to_jax: Callable[[Sequence[Array], Sequence[tuple[int, ...]]], Sequence[Array]]
    to_hf: Callable[[Sequence[Array]], Sequence[Array]]
    layers: tuple[int, ...] | None = None

    def hf_names(self, slot_or_none: int | None) -> list[str]:
        if self.layers is None:
            return list(self.hf)
        return [n.format(i=self.layers[slot_or_none]) for n in self.hf]


def copy(hf: str, jax_path: str, layers=None, flatten: bool = False) -> Rule:
    """Same values, reshaped to the target (a norm scale; with `flatten`, an HF bias [heads*dim] <-> [heads, dim])."""
    return Rule((hf,), (jax_path,), lambda a, shapes: [a[0].reshape(shapes[0])],
                lambda a: [a[0].reshape(-1) if flatten else a[0]], layers)


def linear(hf: str, jax_path: str, n_in: int = 1, layers=None) -> Rule:
    """torch Linear weight [out, in] <-> kernel [*in_dims, *out_dims] (n_in leading dims are inputs)."""

    def to_jax(a, shapes):
        return [a[0].T.reshape(shapes[0])]

    def to_hf(a):
        k = a[0]
        return [k.reshape(math.prod(k.shape[:n_in]), -1).T]

    return Rule((hf,), (jax_path,), to_jax, to_hf, layers)


def conv(hf: str, jax_path: str, layers=None) -> Rule:
    """torch Conv2d weight [out, in, kh, kw] <-> flax kernel [kh, kw, in, out]."""
    return Rule((hf,), (jax_path,), lambda a, s: [a[0].transpose(2, 3, 1, 0).reshape(s[0])],
                lambda a: [a[0].transpose(3, 2, 0, 1)], layers)


def prefixed(rules: Sequence[Rule], hf_prefix: str, jax_prefix: str) -> list[Rule]:
    """A component's rules inside a whole model: HF names get `hf_prefix` ('vision_model_1.'), leo_jax paths get
    `jax_prefix` ('intern_vit/'). Whole-model families (LEO, LEO-MINI) are their components' tables composed so."""
    return [dataclasses.replace(r, hf=tuple(hf_prefix + n for n in r.hf), jax=tuple(jax_prefix + p for p in r.jax))
            for r in rules]


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model family maps to Hugging Face."""

    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values that select this family
    config_cls: type  # the leo_jax model config dataclass (rebuilt from a checkpoint's JSON)
    config_from_hf: Callable[[dict], Any]  # HF config dict -> leo_jax model config dataclass
    config_to_hf: Callable[[Any, dict], dict]  # (model config, original HF config or {}) -> HF config dict
    build: Callable[..., nnx.Module]  # (model config, rngs=...) -> module
    rules: Callable[[Any], list[Rule]]  # model config -> rules
    ignored_hf: tuple[str, ...] = ()  # HF tensors that carry nothing (e.g. buffers): substrings
    write_config: Callable[[dict, Path], None] = lambda hf, out_dir: write_json(out_dir / "config.json", hf)
    with_dtype: Callable[[Any, str, str], Any] = lambda cfg, dtype, param_dtype: dataclasses.replace(
        cfg, dtype=dtype, param_dtype=param_dtype)
    # training config's `data` section -> config.json fields the family's own code reads (templates, tiling)
    data_fields: Callable[[Any], dict] = lambda data_config: {}
    # config.json -> what keeps the family's reference code (e.g. the official LEO) from building it; [] = nothing
    upstream_problems: Callable[[dict], list[str]] = lambda hf: []
    # whole models: (module, out dir, dtype) -> {part: its own Hugging Face directory}; None = one component
    export_components: Callable[..., dict] | None = None


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def _load_family_modules() -> None:
    """Imports every table module in leo_jax.convert (each registers its families)."""
    import importlib
    import pkgutil

    import leo_jax.convert as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("core", "__main__"):
            importlib.import_module(f"leo_jax.convert.{info.name}")


def get_family(name: str) -> Family:
    _load_family_modules()
    if name not in FAMILIES:
        raise ConversionError(f"unknown family {name!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[name]


def detect_family(hf_config: dict, config_path: Path | str = "config.json") -> Family:
    _load_family_modules()
    model_type = hf_config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ConversionError(f"{config_path}: unknown model_type {model_type!r}; supported model types: {known} "
                          f"(or pass --family explicitly)")


# ----------------------------------------------------------------------------------------------------------------
# Safetensors I/O, tensor by tensor

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


def torch_to_numpy(tensor) -> Array:
    """torch tensor -> numpy, keeping bfloat16 bits exactly (as ml_dtypes.bfloat16)."""
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def numpy_to_torch(array: Array):
    import torch

    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch wants writable memory; arrays from JAX are read-only views
        array = array.copy()
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def transformers_config_writer(config_class: str, derived: tuple[str, ...] = ()) -> Callable[[dict, Path], None]:
    """A `Family.write_config` that writes config.json through transformers' own config class, exactly as
    `save_pretrained` does; `derived` fields are recomputed by that class, so stale copies are dropped."""

    def write(hf: dict, out_dir: Path) -> None:
        import transformers

        kwargs = {k: v for k, v in hf.items() if k not in ("model_type", "transformers_version") + derived}
        getattr(transformers, config_class)(**kwargs).save_pretrained(out_dir)

    return write


class HFCheckpoint:
    """A Hugging Face directory (config.json + model.safetensors or sharded with an index), read lazily."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"{self.path} is not a directory with config.json and *.safetensors")
        self.config = read_json(self.path / "config.json", "a Hugging Face directory needs config.json",
                                "fix or re-export it", ConversionError)
        if (self.path / SAFE_INDEX).is_file():
            index = read_json(self.path / SAFE_INDEX, "the safetensors index", "fix or re-export it", ConversionError)
            if "weight_map" not in index:
                raise ConversionError(f"{self.path / SAFE_INDEX} has no 'weight_map'")
            self.file_of = dict(index["weight_map"])
        elif (self.path / SAFE_SINGLE).is_file():
            with safe_open(self.path / SAFE_SINGLE, framework="pt") as f:
                self.file_of = {k: SAFE_SINGLE for k in f.keys()}
        else:
            found = sorted(p.name for p in self.path.iterdir())
            raise ConversionError(f"{self.path}: no {SAFE_SINGLE} or {SAFE_INDEX} (found {found}); only safetensors "
                                  f"checkpoints are read: re-save with save_pretrained(safe_serialization=True)")
        self._handles: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str, needed_for: str = "") -> Array:
        from safetensors import safe_open

        if name not in self.file_of:
            why = f" (needed for leo_jax parameter {needed_for})" if needed_for else ""
            raise ConversionError(f"{self.path}: missing tensor {name!r}{why}; is this the right family/config?")
        file = self.file_of[name]
        if file not in self._handles:
            if not (self.path / file).is_file():
                raise ConversionError(f"{self.path / file} listed in the index for {name!r} does not exist")
            self._handles[file] = safe_open(self.path / file, framework="pt")
        return torch_to_numpy(self._handles[file].get_tensor(name))

    def dtype(self) -> str:
        """The checkpoint's storage dtype as a name ('bfloat16', 'float32', ...), from the first tensor."""
        first = self.get(self.names[0])
        return {v: k for k, v in DTYPES.items()}.get(first.dtype, "float32")


class SafetensorsWriter:
    """Writes tensors as save_pretrained does: one model.safetensors, or numbered shards plus an index when the
    total exceeds `max_shard_bytes`. Holds at most one shard in memory."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 1024**3):
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, Any] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total = 0

    def add(self, name: str, array: Array) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise ConversionError(f"tensor {name!r} written twice: two rules map to the same HF name")
        nbytes = array.nbytes
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = numpy_to_torch(array)
        self._pending_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        names = sorted(self._pending)
        save_file({k: self._pending[k] for k in names}, self.out_dir / f".shard-{len(self._shards)}.tmp",
                  metadata={"format": "pt"})
        self._shards.append(names)
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.out_dir / ".shard-0.tmp", self.out_dir / SAFE_SINGLE)
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f".shard-{i}.tmp", self.out_dir / file)
            weight_map.update({k: file for k in names})
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.out_dir / SAFE_INDEX, index)


# ----------------------------------------------------------------------------------------------------------------
# Import / export of parameter trees


def _flat_abstract(module_or_state) -> dict[str, nnx.Variable]:
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
    return {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


def _check_shape(array: Array, shape: tuple[int, ...], hf_name: str, jax_path: str, source: Path) -> None:
    if tuple(array.shape) != tuple(shape):
        raise ConversionError(f"{source}: tensor {hf_name!r} converts to shape {tuple(array.shape)} but leo_jax "
                              f"parameter {jax_path} has shape {tuple(shape)}: the config does not match the weights")


def _to_jax(rule: Rule, ckpt: HFCheckpoint, names: list[str], shapes: list[tuple[int, ...]]) -> Sequence[Array]:
    tensors = [ckpt.get(n, rule.jax[0]) for n in names]
    try:
        return rule.to_jax(tensors, shapes)
    except ValueError as e:  # a reshape that cannot fit: the weights do not match the config
        got = ", ".join(f"{n!r} {tuple(t.shape)}" for n, t in zip(names, tensors))
        raise ConversionError(f"{ckpt.path}: tensor(s) {got} do not fit leo_jax parameter(s) {list(rule.jax)} of shape "
                              f"{[tuple(s) for s in shapes]}: the config does not match the weights ({e})") from e


def import_params(family: Family, cfg: Any, ckpt: HFCheckpoint, abstract_state: nnx.State,
                  shardings: nnx.State | None = None) -> dict[str, jax.Array]:
    """Reads every rule's tensors and returns {param path: jax.Array} in the param dtype, placed with `shardings`.

    Stacked parameters are filled one layer at a time into one host buffer, which is handed to the device and
    dropped before the next parameter is read."""
    targets = _flat_abstract(abstract_state)
    placement = {} if shardings is None else {"/".join(map(str, p)): s for p, s in nnx.to_flat_state(shardings)}
    out: dict[str, jax.Array] = {}
    used: set[str] = set()
    for rule in family.rules(cfg):
        for path in rule.jax:
            if path not in targets:
                raise ConversionError(f"rule for {rule.hf} targets unknown leo_jax parameter {path!r}")
        full_shapes = [tuple(targets[p].get_value().shape) for p in rule.jax]
        dtypes = [targets[p].get_value().dtype for p in rule.jax]
        if rule.layers is None:
            names = rule.hf_names(None)
            arrays = _to_jax(rule, ckpt, names, full_shapes)
            used.update(names)
            buffers = [np.asarray(a).astype(d) for a, d in zip(arrays, dtypes)]
            for a, s, p in zip(buffers, full_shapes, rule.jax):
                _check_shape(a, s, names[0], p, ckpt.path)
        else:
            for p, s in zip(rule.jax, full_shapes):
                if s[0] != len(rule.layers):
                    raise ConversionError(f"leo_jax parameter {p} stacks {s[0]} layers but the rule maps "
                                          f"{len(rule.layers)}")
            buffers = [np.empty(s, d) for s, d in zip(full_shapes, dtypes)]
            for slot in range(len(rule.layers)):
                names = rule.hf_names(slot)
                arrays = _to_jax(rule, ckpt, names, [s[1:] for s in full_shapes])
                used.update(names)
                for buf, a, p in zip(buffers, arrays, rule.jax):
                    _check_shape(np.asarray(a), buf.shape[1:], names[0], f"{p}[{slot}]", ckpt.path)
                    buf[slot] = a
        for p, buf in zip(rule.jax, buffers):
            if p in out:
                raise ConversionError(f"two rules fill leo_jax parameter {p}")
            out[p] = jax.device_put(buf, placement.get(p))
            del buf
    missing = sorted(set(targets) - set(out))
    if missing:
        raise ConversionError(f"no rule fills leo_jax parameters {missing} for family {family.name}")
    unused = [n for n in ckpt.names if n not in used and not any(s in n for s in family.ignored_hf)]
    if unused:
        raise ConversionError(f"{ckpt.path}: tensors {unused[:8]}{' ...' if len(unused) > 8 else ''} were not "
                              f"converted: the config ({family.name}) does not describe this checkpoint")
    return out


def export_tensors(family: Family, cfg: Any, params: dict[str, Any], dtype: Any = None) -> Iterator[tuple[str, Array]]:
    """Yields (HF name, numpy array) one layer at a time from {param path: array}."""
    for rule in family.rules(cfg):
        for p in rule.jax:
            if p not in params:
                raise ConversionError(f"leo_jax checkpoint has no parameter {p!r} (needed for {rule.hf})")
        slots = [None] if rule.layers is None else range(len(rule.layers))
        for slot in slots:
            arrays = [np.asarray(params[p] if slot is None else params[p][slot]) for p in rule.jax]
            for name, a in zip(rule.hf_names(slot), rule.to_hf(arrays)):
                yield name, np.ascontiguousarray(a if dtype is None else a.astype(dtype))
