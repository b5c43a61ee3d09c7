"""Loading ml_collections config files (by path or preset name) and validating sections into typed dataclasses."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.resources
import importlib.util
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

PRESET_PACKAGE = "leo_jax.configs"


def preset_names() -> list[str]:
    """Every module shipped in leo_jax/configs (presets and the helper modules they compose)."""
    files = importlib.resources.files(PRESET_PACKAGE).iterdir()
    return sorted(f.name[:-3] for f in files if f.name.endswith(".py") and not f.name.startswith("_"))


def _is_path(name_or_path: str) -> bool:
    return name_or_path.endswith(".py") or "/" in name_or_path or "\\" in name_or_path


def _import_config_module(name_or_path: str) -> types.ModuleType:
    """A preset name imports leo_jax.configs.<name>; a path is executed as a file (it may import leo_jax.configs.*)."""
    if not _is_path(name_or_path):
        if name_or_path not in preset_names():
            raise FileNotFoundError(f"config {name_or_path!r} is neither a preset nor a path to a .py file; "
                                    f"presets: {preset_names()}")
        return _checked(importlib.import_module(f"{PRESET_PACKAGE}.{name_or_path}"), name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        hint = f"; the preset is now named {path.stem!r}" if path.stem in preset_names() else ""
        raise FileNotFoundError(f"config file {path} not found{hint}; presets: {preset_names()}")
    spec = importlib.util.spec_from_file_location(f"_leo_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"config file {path} cannot be parsed: {e.msg} (line {e.lineno})") from e
    return _checked(module, path)


def _checked(module: types.ModuleType, where) -> types.ModuleType:
    if not hasattr(module, "get_config"):
        raise ValueError(f"config {where} has no get_config() function")
    return module


def parse_override_value(text: str) -> Any:
    """'3' -> 3, '1e-4' -> 1e-4, 'true' -> True, "('a', 1)" -> tuple, anything else -> the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies 'a.b.c=value' strings; errors name the unknown field or the type clash."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like 'field.path=value'")
        key = key.removeprefix("--").removeprefix("config.")
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node:
                raise ValueError(f"override {item!r}: config has no field 'config.{'.'.join(parents[:i + 1])}'")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"override {item!r}: config has no field 'config.{key}'; "
                             f"fields there: {sorted(node.keys())}")
        try:
            node[leaf] = parse_override_value(raw)
        except TypeError as e:
            expected = type(node[leaf]).__name__
            raise ValueError(f"override {item!r}: config.{key} expects a {expected}, got {raw!r}") from e
    return config


def load_config(name_or_path: str, overrides: Sequence[str] = (), arg: str | None = None) -> ml_collections.ConfigDict:
    """Loads preset `name` (leo_jax/configs/<name>.py) or a config file path, calls get_config([arg]) and applies
    overrides."""
    module = _import_config_module(name_or_path)
    config = module.get_config(arg) if arg is not None else module.get_config()
    return apply_overrides(config, overrides)


def config_from_argv(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Splits `--config NAME|PATH[:arg]` and `--config.x=v` out of argv; returns (config, remaining argv)."""
    name, overrides, rest = None, [], []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            name, i = args[i + 1], i + 2
            continue
        if a.startswith("--config="):
            name = a.split("=", 1)[1]
        elif a.startswith("--config."):
            overrides.append(a[len("--"):])
        else:
            rest.append(a)
        i += 1
    if name is None:
        raise ValueError("missing --config: give a preset name (e.g. tiny_llama) or a path to a config .py file")
    name, _, arg = name.partition(":")
    return load_config(name, overrides, arg or None), rest


def config_name(argv: Sequence[str]) -> str:
    """The `--config` value of a command line as given (for printing), '?' without one."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return "?"


def parse_cli(parser, argv: Sequence[str]):
    """(config, args) for a command line with `--config NAME|PATH[:arg]`, `--config.x=v` overrides and the parser's
    other flags; `--help` prints the parser's help and exits 0; config errors exit through `parser.error`."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        raise SystemExit(0)
    try:
        config, rest = config_from_argv(argv)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return config, parser.parse_args(["--config", "x"] + rest)


class FrozenDict(dict):
    """An immutable, hashable dict: free-form config sections (rope scaling, preprocessor options) inside frozen
    config dataclasses, so every config hashes by construction (JAX hashes module configs as part of a static graph
    definition, e.g. a jitted generate). Serialises as a plain dict."""

    def _immutable(self, *args, **kwargs):
        raise TypeError("a config section is immutable: build a new one (dataclasses.replace / {**section, ...})")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _immutable

    def __hash__(self):
        return hash(tuple(self.items()))

    def __reduce__(self):
        return FrozenDict, (dict(self),)


def freeze(value: Any) -> Any:
    """Mappings -> FrozenDict and lists -> tuples, recursively; anything else as is."""
    if isinstance(value, Mapping):
        items = value.to_dict().items() if hasattr(value, "to_dict") else value.items()
        return FrozenDict((k, freeze(v)) for k, v in items)
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a section of {annotation.__name__} fields, got {value!r}")
        build = getattr(annotation, "from_config", None)
        return build(value, where) if build else dataclass_from_config(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"{where}: expected a sequence, got {value!r}")
        args = typing.get_args(annotation)
        if args and args[-1] is not Ellipsis and len(args) == len(value):
            return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return tuple(_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, dict)):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(annotation)
        if args and args[1] is not Any:
            items = value.to_dict().items() if hasattr(value, "to_dict") else value.items()
            return FrozenDict((k, _check_type(v, args[1], f"{where}.{k}")) for k, v in items)
        return freeze(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def dataclass_from_config(cls: type, config: Mapping[str, Any], where: str):
    """Builds a (frozen) dataclass from a config mapping, once: fields annotated with a dataclass type (alone, in a
    tuple or as `dict[str, ...]` values) become nested dataclasses (through their `from_config` where they have
    one), free-form dicts become FrozenDicts and sequences tuples, so the result hashes. Unknown, missing or
    ill-typed fields are errors that name the full path (`where.field.subfield`). Each dataclass's own
    `__post_init__` checks cross-field rules."""
    if isinstance(config, cls):
        return config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name not in config:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}.{name} is required")
            continue
        kwargs[name] = _check_type(config[name], hints[name], f"{where}.{name}")
    return cls(**kwargs)


def require(condition: bool, message: str) -> None:
    """Raises ValueError(message) when a config rule is broken."""
    if not condition:
        raise ValueError(message)
