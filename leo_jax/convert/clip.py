"""Conversion table for the CLIP ViT: transformers `CLIPVisionModel` checkpoints (model_type 'clip_vision_model')."""

from __future__ import annotations

from leo_jax.convert.core import Family, Rule, conv, copy, register, transformers_config_writer
from leo_jax.convert.vit import (
    CLIP_BLOCK_NAMES,
    activation_from_hf,
    activation_to_hf,
    norm,
    require_fields,
    require_values,
    tower_family,
    vit_block_rules,
)
from leo_jax.models.vision.clip import CLIPVisionConfig, CLIPVisionEncoder


def config_from_hf(hf: dict) -> CLIPVisionConfig:
    require_fields(hf, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                        "image_size"), "a CLIP vision encoder")
    require_values(hf, {"attention_dropout": 0.0}, "CLIP vision encoder")
    return CLIPVisionConfig(
        hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], patch_size=hf["patch_size"], image_size=hf["image_size"],
        num_channels=hf.get("num_channels", 3), layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        hidden_act=activation_from_hf(hf.get("hidden_act", "quick_gelu")), dtype="float32", param_dtype="float32")


def config_to_hf(cfg: CLIPVisionConfig, original: dict) -> dict:
    hf = dict(original)
    hf.update(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, patch_size=cfg.patch_size,
              image_size=cfg.image_size, num_channels=cfg.num_channels, layer_norm_eps=cfg.layer_norm_eps,
              hidden_act=activation_to_hf(cfg.hidden_act, original.get("hidden_act")), model_type="clip_vision_model")
    hf.setdefault("architectures", ["CLIPVisionModel"])
    return hf


def rules(cfg: CLIPVisionConfig) -> list[Rule]:
    return [conv("embeddings.patch_embedding.weight", "patch_embed/kernel"),
            copy("embeddings.class_embedding", "class_embedding"),
            copy("embeddings.position_embedding.weight", "position_embedding"),
            *norm("pre_layrnorm", "pre_norm"), *norm("post_layernorm", "post_norm"),
            *vit_block_rules("encoder.layers.{i}.", tuple(range(cfg.num_layers)), CLIP_BLOCK_NAMES)]


CLIP = register(Family(
    name="clip_vision", model_types=("clip_vision_model",), config_cls=CLIPVisionConfig,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, build=CLIPVisionEncoder, rules=rules,
    ignored_hf=("position_ids",), write_config=transformers_config_writer("CLIPVisionConfig")))
CLIP_TOWER = tower_family(CLIP, "clip_vision_tower", "clip", "vision_model.", "CLIPConfig",
                          ("text_model.", "text_projection.", "visual_projection.", "logit_scale"))
