"""One loader for every model directory inference takes, detected from its files:

- a training workdir, its checkpoints/ directory or one step directory (Orbax step layout: `<step>/state` and
  `<step>/config`): the run's own config;
- a leo_jax checkpoint written by `convert import-hf` (`leo_model.json` + `params/`);
- an exported model directory (`config.json` + `*.safetensors`, as `convert export` writes), read through the
  conversion tables.

The last two carry no training config: its `data` section (tokenizer, template, tiling) is rebuilt from the
tokenizer and preprocessing files next to the weights (`leo_jax.data.export_files.read_data_config`).
Parameters are read straight onto `mesh`, placed by their logical axes, so a model too large for one device
spreads over all of them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from leo_jax.checkpoints import META_FILE, find_checkpoint, load_trained
from leo_jax.convert.core import SAFE_INDEX, SAFE_SINGLE
from leo_jax.data.export_files import read_data_config
from leo_jax.models.registry import kind_of

TRAINING, CONVERTED, EXPORTED = "training", "converted", "exported"


def directory_kind(path: str | os.PathLike) -> str:
    """'training', 'converted' or 'exported' from the files in `path`; FileNotFoundError listing what was looked
    for when it is none of them."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if (path / META_FILE).is_file():
        return CONVERTED
    if (path / "config.json").is_file() and ((path / SAFE_SINGLE).is_file() or (path / SAFE_INDEX).is_file()):
        return EXPORTED
    try:
        find_checkpoint(str(path))
        return TRAINING
    except FileNotFoundError as e:
        training_error = str(e).split(":")[0]  # "no checkpoints found in DIR"
    raise FileNotFoundError(
        f"{path} is no model directory leo_jax knows: looked for a training checkpoint ({training_error}; a workdir "
        f"with checkpoints/<step>/, or <step>/ holding 'state' and 'config'), {path / META_FILE} (a checkpoint from "
        f"`convert import-hf`) and {path / 'config.json'} with {SAFE_SINGLE} or {SAFE_INDEX} (an exported model); "
        f"found {sorted(p.name for p in path.iterdir())}")


def load_any(path: str | os.PathLike, dtype: Any = None, mesh: jax.sharding.Mesh | None = None
             ) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """(model, config with `model` and `data` sections) from any model directory (see `directory_kind`).

    `dtype` casts the floating-point parameters (e.g. 'bfloat16'); `mesh` is where they go (default: the first
    device)."""
    kind = directory_kind(path)
    if kind == TRAINING:
        return load_trained(str(path), dtype=dtype, mesh=mesh)
    from leo_jax.convert.api import load_hf, load_leo

    data = read_data_config(path)  # first: a missing tokenizer is reported before any weight is read
    if kind == CONVERTED:
        model = load_leo(path, param_dtype=dtype, mesh=mesh)
    else:
        model = load_hf(path, dtype=None, param_dtype=dtype, mesh=mesh)
    config = ml_collections.ConfigDict({"model": {"kind": kind_of(model.cfg), **dataclasses.asdict(model.cfg)},
                                        "data": data})
    return model, config
