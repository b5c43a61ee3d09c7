"""The converted-model format: Orbax parameters `{param path: array}` under `params/` plus `leo_model.json`
(family, model config, the original Hugging Face config and dtype), written by `convert import-hf`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax

from leo_jax.jsonfile import read_json, write_json

META_FILE = "leo_model.json"


def save_leo_checkpoint(out_dir: str | os.PathLike, family: str, cfg: Any, params: dict[str, jax.Array],
                        hf_config: dict, hf_dtype: str) -> Path:
    """Writes `params` and the meta file into the new or empty directory `out_dir`; `cfg` is the model config
    dataclass of conversion family `family`."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty; choose a new --out directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out_dir / "params", params)
    meta = {"family": family, "model": dataclasses.asdict(cfg), "hf_config": hf_config, "hf_dtype": hf_dtype}
    write_json(out_dir / META_FILE, meta)
    return out_dir


def read_leo_meta(ckpt_dir: str | os.PathLike) -> dict:
    """The meta file of a converted checkpoint as a dict."""
    return read_json(Path(ckpt_dir) / META_FILE, f"{ckpt_dir} is not a leo_jax model checkpoint (write one with "
                     "`python -m leo_jax.convert import-hf --src HF_DIR --out CKPT_DIR`)", "fix it or convert again")


def load_leo_params(ckpt_dir: str | os.PathLike, abstract: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """Restores {param path: array}; with `abstract` ({path: ShapeDtypeStruct with sharding}) onto those shardings."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(ckpt_dir).absolute() / "params", abstract)
