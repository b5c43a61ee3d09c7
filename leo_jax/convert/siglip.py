"""Conversion table for SigLIP: transformers `SiglipVisionModel` checkpoints (model_type 'siglip_vision_model')."""

from __future__ import annotations

from leo_jax.convert.core import Family, Rule, conv, copy, register, transformers_config_writer
from leo_jax.convert.vit import (
    CLIP_BLOCK_NAMES,
    activation_from_hf,
    activation_to_hf,
    fused_qkv,
    linear_with_bias,
    norm,
    require_fields,
    require_values,
    tower_family,
    vit_block_rules,
)
from leo_jax.models.vision.siglip import SiglipVisionConfig, SiglipVisionEncoder


def config_from_hf(hf: dict) -> SiglipVisionConfig:
    require_fields(hf, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                        "image_size"), "a SigLIP vision encoder")
    require_values(hf, {"attention_dropout": 0.0}, "SigLIP vision encoder")
    return SiglipVisionConfig(
        hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], patch_size=hf["patch_size"], image_size=hf["image_size"],
        num_channels=hf.get("num_channels", 3), layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
        hidden_act=activation_from_hf(hf.get("hidden_act", "gelu_pytorch_tanh")),
        use_head=bool(hf.get("vision_use_head", True)), dtype="float32", param_dtype="float32")


def config_to_hf(cfg: SiglipVisionConfig, original: dict) -> dict:
    hf = dict(original)
    hf.update(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, patch_size=cfg.patch_size,
              image_size=cfg.image_size, num_channels=cfg.num_channels, layer_norm_eps=cfg.layer_norm_eps,
              hidden_act=activation_to_hf(cfg.hidden_act, original.get("hidden_act")), vision_use_head=cfg.use_head,
              model_type="siglip_vision_model")
    hf.setdefault("architectures", ["SiglipVisionModel"])
    return hf


def rules(cfg: SiglipVisionConfig) -> list[Rule]:
    out = [conv("embeddings.patch_embedding.weight", "patch_embed/kernel"),
           copy("embeddings.patch_embedding.bias", "patch_embed/bias"),
           copy("embeddings.position_embedding.weight", "position_embedding"),
           *norm("post_layernorm", "post_norm"),
           *vit_block_rules("encoder.layers.{i}.", tuple(range(cfg.num_layers)), CLIP_BLOCK_NAMES)]
    if cfg.use_head:  # torch.nn.MultiheadAttention keeps q, k, v in one in_proj
        out += [copy("head.probe", "head/probe"),
                fused_qkv("head.attention.in_proj_weight", "head", None),
                fused_qkv("head.attention.in_proj_bias", "head", None, bias=True),
                *linear_with_bias("head.attention.out_proj", "head/o_proj", None, n_in=2),
                *norm("head.layernorm", "head/norm"),
                *linear_with_bias("head.mlp.fc1", "head/mlp/fc1", None),
                *linear_with_bias("head.mlp.fc2", "head/mlp/fc2", None)]
    return out


SIGLIP = register(Family(
    name="siglip_vision", model_types=("siglip_vision_model",), config_cls=SiglipVisionConfig,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, build=SiglipVisionEncoder, rules=rules,
    ignored_hf=("position_ids",), write_config=transformers_config_writer("SiglipVisionConfig")))
SIGLIP_TOWER = tower_family(SIGLIP, "siglip_vision_tower", "siglip", "vision_model.", "SiglipConfig",
                            ("text_model.", "logit_scale", "logit_bias"))
