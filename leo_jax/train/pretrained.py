"""Initialising model components (LLM, vision encoders) from checkpoints named in `config.train.init`.

A component is a module path of the model ('llm', 'intern_vit', 'experts/clip', ...; '' = the whole model); its
checkpoint is a leo_jax checkpoint directory (`python -m leo_jax.convert import-hf`), a Hugging Face directory
(converted on the fly), or a step directory of an earlier training run (WORKDIR/checkpoints/STEP: the next stage of
a recipe starts from the previous stage's parameters, with a fresh optimizer).
Every parameter of the component must come from the checkpoint, except adapters that the pretrained model does not
have (MMoE routers and LoRA experts, under '.../mmoe/...'), which keep their fresh initialisation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leo_jax.checkpoints import META_FILE, load_leo_params, load_training_params
from leo_jax.convert.api import abstract_model
from leo_jax.convert.core import HFCheckpoint, detect_family, import_params
from leo_jax.train.optimizer import param_path
from leo_jax.train.state import TrainState

logger = logging.getLogger("leo_jax.train")

ADAPTER_MARK = "/mmoe/"  # parameters added on top of a pretrained LLM


def load_component(ckpt_dir: str, prefix: str = "") -> dict[str, jax.Array]:
    """{parameter path inside the component: array} from a leo_jax, Hugging Face or trainer checkpoint directory."""
    path = Path(ckpt_dir)
    if (path / "state").is_dir():
        return load_training_params(path, prefix)
    if (path / META_FILE).exists():
        return load_leo_params(path)
    if (path / "config.json").exists():
        ckpt = HFCheckpoint(path)
        family = detect_family(ckpt.config, path / "config.json")
        cfg = family.with_dtype(family.config_from_hf(ckpt.config), "float32", "float32")
        return import_params(family, cfg, ckpt, nnx.state(abstract_model(family, cfg), nnx.Param))
    raise FileNotFoundError(f"config.train.init: {ckpt_dir} is not a leo_jax checkpoint ({META_FILE}), a Hugging "
                            "Face directory (config.json + *.safetensors) or a training checkpoint step (state/)")


def apply_init(state: TrainState, init: Mapping[str, str]) -> TrainState:
    """The state with each named component's parameters replaced by its checkpoint's (placed on their current
    shardings, cast to their dtype)."""
    groups = {"trainable": dict(nnx.to_flat_state(state.trainable)), "frozen": dict(nnx.to_flat_state(state.frozen))}
    for prefix, ckpt_dir in init.items():
        prefix = prefix.strip("/")  # '' = the whole model (a plain LLM)
        start = len(prefix) + 1 if prefix else 0
        targets = {param_path(p)[start:]: (group, p) for group, flat in groups.items() for p, v in flat.items()
                   if isinstance(v, nnx.Param) and param_path(p).startswith(prefix + "/" if prefix else "")}
        if not targets:
            tops = sorted({param_path(p).split("/")[0] for flat in groups.values() for p in flat})
            raise ValueError(f"config.train.init: the model has no parameters under {prefix!r}; top-level modules: "
                             f"{tops}")
        loaded = load_component(ckpt_dir, prefix)
        unexpected = sorted(set(loaded) - set(targets))
        missing = sorted(n for n in targets if n not in loaded and ADAPTER_MARK not in f"/{prefix}/{n}")
        if unexpected or missing:
            raise ValueError(f"config.train.init[{prefix!r}] = {ckpt_dir}: the checkpoint does not fit the component "
                             f"(in the checkpoint only: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
                             f"missing from it: {missing[:5]}{'...' if len(missing) > 5 else ''})")
        for name, array in loaded.items():
            group, key = targets[name]
            variable = groups[group][key]
            current = variable.get_value()
            if tuple(array.shape) != tuple(current.shape):
                raise ValueError(f"config.train.init[{prefix!r}] = {ckpt_dir}: {name} has shape {tuple(array.shape)} "
                                 f"in the checkpoint but {tuple(current.shape)} in the model")
            value = jax.device_put(jnp.asarray(np.asarray(array), current.dtype), current.sharding)
            groups[group][key] = variable.replace(value)
        logger.info("init: %s <- %s (%d tensors; %d adapter tensors keep their initialisation)", prefix, ckpt_dir,
                    len(loaded), len(targets) - len(loaded))
    return state.replace(trainable=nnx.from_flat_state(list(groups["trainable"].items())),
                         frozen=nnx.from_flat_state(list(groups["frozen"].items())))
