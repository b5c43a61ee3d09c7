"""Enumerates the model presets in leo_jax/configs/ and their partition specs (for the checked-in golden file)."""

from __future__ import annotations

from flax import nnx

from leo_jax.config import load_config, preset_names
from leo_jax.models.registry import abstract_model
from leo_jax.sharding import logical_specs


def model_presets() -> list[str]:
    """Names of the shipped presets whose get_config() defines `model` (not helper modules like common.py)."""
    return [name for name in preset_names() if name != "common" and "model" in load_config(name)]


def partition_specs(preset: str) -> dict[str, list]:
    """{param path: PartitionSpec entries (mesh axis names or lists of them or None)} for a preset."""
    model = abstract_model(load_config(preset).model)
    specs = logical_specs(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): [list(e) if isinstance(e, tuple) else e for e in spec]
            for path, spec in nnx.to_flat_state(specs)}
