"""Model kinds by name: `config.model.kind` -> (config dataclass, module class), imported lazily."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from flax import nnx

# kind -> "module:ConfigClass:ModelClass". Each model file owns its config dataclass with a `from_config`.
MODEL_KINDS: dict[str, str] = {
    "llm": "leo_jax.models.llm.decoder:LLMConfig:CausalLM",
    "leo": "leo_jax.models.leo:LeoConfig:Leo",
    "leo_mini": "leo_jax.models.leo_mini:LeoMiniConfig:LeoMini",
    "convnext": "leo_jax.models.vision.convnext:ConvNextConfig:ConvNext",
    "pix2struct_vision": "leo_jax.models.vision.pix2struct:Pix2StructVisionConfig:Pix2StructVisionEncoder",
    "eva02": "leo_jax.models.vision.eva02:EVA02Config:EVA02VisionEncoder",
    "clip_vision": "leo_jax.models.vision.clip:CLIPVisionConfig:CLIPVisionEncoder",
    "siglip_vision": "leo_jax.models.vision.siglip:SiglipVisionConfig:SiglipVisionEncoder",
    "intern_vit": "leo_jax.models.vision.intern_vit:InternViTConfig:InternViT",
    "sam_vision": "leo_jax.models.vision.sam:SamVisionConfig:SamVisionEncoder",
}


def model_classes(kind: str) -> tuple[type, type]:
    if kind not in MODEL_KINDS:
        raise ValueError(f"config.model.kind={kind!r} is unknown; choose one of {sorted(MODEL_KINDS)}")
    module_name, config_name, model_name = MODEL_KINDS[kind].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, model_name)


def kind_of(cfg: Any) -> str:
    """The `config.model.kind` whose config dataclass `cfg` is."""
    for kind in MODEL_KINDS:
        if isinstance(cfg, model_classes(kind)[0]):
            return kind
    raise ValueError(f"{type(cfg).__name__} is the config of no model kind in {sorted(MODEL_KINDS)}")


def model_config(model: Mapping[str, Any], where: str = "config.model") -> Any:
    """The validated config dataclass of `config.model` (all fields but `kind`)."""
    model = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    if "kind" not in model:
        raise ValueError(f"{where}.kind is required; choose one of {sorted(MODEL_KINDS)}")
    config_cls, _ = model_classes(model["kind"])
    return config_cls.from_config({k: v for k, v in model.items() if k != "kind"}, where)


def build_model(model: Mapping[str, Any], rngs: nnx.Rngs, where: str = "config.model") -> nnx.Module:
    _, model_cls = model_classes(dict(model)["kind"])
    return model_cls(model_config(model, where), rngs=rngs)


def abstract_model(model: Mapping[str, Any], where: str = "config.model") -> nnx.Module:
    """The model with shapes only (nothing allocated)."""
    cfg = model_config(model, where)
    _, model_cls = model_classes(dict(model)["kind"])
    return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
