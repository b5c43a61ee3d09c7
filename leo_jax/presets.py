"""Enumerates the model presets in configs/ and their partition specs (for the checked-in golden file)."""

from __future__ import annotations

from leo_jax.config import CONFIG_DIR, load_config
from leo_jax.models.registry import abstract_model
from leo_jax.sharding import logical_specs
from flax import nnx


def model_presets() -> list[str]:
    """Names of configs/*.py whose get_config() defines `model` (not helper modules like common.py)."""
    names = []
    for path in sorted(CONFIG_DIR.glob("*.py")):
        if path.stem.startswith("_") or path.stem == "common":
            continue
        if "model" in load_config(path.stem):
            names.append(path.stem)
    return names


def partition_specs(preset: str) -> dict[str, list]:
    """{param path: PartitionSpec entries (mesh axis names or lists of them or None)} for a preset."""
    model = abstract_model(load_config(preset).model)
    specs = logical_specs(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): [list(e) if isinstance(e, tuple) else e for e in spec]
            for path, spec in nnx.to_flat_state(specs)}
