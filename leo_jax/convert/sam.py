"""Conversion table for the SAM image encoder: transformers `SamVisionModel` checkpoints (model_type
'sam_vision_model', tensors under 'vision_encoder.'). HF layer i goes to slot i of the windowed or the global stack
(leo_jax/models/vision/sam.py); the fused qkv is split into q/k/v."""

from __future__ import annotations

from leo_jax.convert.core import Family, Rule, conv, copy, register, transformers_config_writer
from leo_jax.convert.vit import (
    activation_from_hf,
    activation_to_hf,
    fused_qkv,
    norm,
    require_fields,
    require_values,
    single_int,
    tower_family,
    vit_block_rules,
)
from leo_jax.models.vision.sam import SamVisionConfig, SamVisionEncoder

PREFIX = "vision_encoder."


def config_from_hf(hf: dict) -> SamVisionConfig:
    require_fields(hf, ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"),
                   "a SAM vision encoder")
    require_values(hf, {"attention_dropout": 0.0}, "SAM vision encoder")
    hidden = hf["hidden_size"]
    mlp_dim = hf.get("mlp_dim") or int(hidden * hf.get("mlp_ratio", 4.0))
    return SamVisionConfig(
        hidden_size=hidden, num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"], mlp_dim=mlp_dim,
        patch_size=single_int(hf["patch_size"], "patch_size"), image_size=single_int(hf["image_size"], "image_size"),
        num_channels=hf.get("num_channels", 3), output_channels=hf.get("output_channels", 256),
        window_size=hf.get("window_size", 14), global_attn_indexes=tuple(hf.get("global_attn_indexes", (2, 5, 8, 11))),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
        hidden_act=activation_from_hf(hf.get("hidden_act", "gelu")), qkv_bias=bool(hf.get("qkv_bias", True)),
        use_abs_pos=bool(hf.get("use_abs_pos", True)), use_rel_pos=bool(hf.get("use_rel_pos", True)),
        dtype="float32", param_dtype="float32")


def config_to_hf(cfg: SamVisionConfig, original: dict) -> dict:
    hf = dict(original)
    hf.update(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              mlp_dim=cfg.mlp_dim, patch_size=cfg.patch_size, image_size=cfg.image_size,
              num_channels=cfg.num_channels, output_channels=cfg.output_channels, window_size=cfg.window_size,
              global_attn_indexes=list(cfg.global_attn_indexes), layer_norm_eps=cfg.layer_norm_eps,
              hidden_act=activation_to_hf(cfg.hidden_act, original.get("hidden_act")), qkv_bias=cfg.qkv_bias,
              use_abs_pos=cfg.use_abs_pos, use_rel_pos=cfg.use_rel_pos, model_type="sam_vision_model")
    hf.setdefault("architectures", ["SamVisionModel"])
    return hf


def _stack_rules(cfg: SamVisionConfig, stack: str, layers: tuple[int, ...]) -> list[Rule]:
    if not layers:
        return []
    p = PREFIX + "layers.{i}."
    names = dict(norm1="layer_norm1", norm2="layer_norm2", o="attn.proj", fc1="mlp.lin1", fc2="mlp.lin2")
    rules = vit_block_rules(p, layers, names, stack=stack) + [fused_qkv(p + "attn.qkv.weight", f"{stack}/attn",
                                                                         layers)]
    if cfg.qkv_bias:
        rules.append(fused_qkv(p + "attn.qkv.bias", f"{stack}/attn", layers, bias=True))
    if cfg.use_rel_pos:
        rules += [copy(p + "attn.rel_pos_h", f"{stack}/attn/rel_pos_h", layers),
                  copy(p + "attn.rel_pos_w", f"{stack}/attn/rel_pos_w", layers)]
    return rules


def rules(cfg: SamVisionConfig) -> list[Rule]:
    out = [conv(PREFIX + "patch_embed.projection.weight", "patch_embed/kernel"),
           copy(PREFIX + "patch_embed.projection.bias", "patch_embed/bias"),
           *_stack_rules(cfg, "window_layers", cfg.window_layers),
           *_stack_rules(cfg, "global_layers", cfg.global_layers),
           conv(PREFIX + "neck.conv1.weight", "neck/conv1/kernel"), *norm(PREFIX + "neck.layer_norm1", "neck/norm1"),
           conv(PREFIX + "neck.conv2.weight", "neck/conv2/kernel"), *norm(PREFIX + "neck.layer_norm2", "neck/norm2")]
    return out + ([copy(PREFIX + "pos_embed", "pos_embed")] if cfg.use_abs_pos else [])


SAM = register(Family(
    name="sam_vision", model_types=("sam_vision_model",), config_cls=SamVisionConfig,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, build=SamVisionEncoder, rules=rules,
    write_config=transformers_config_writer("SamVisionConfig")))
SAM_TOWER = tower_family(SAM, "sam_vision_tower", "sam", "", "SamConfig",  # SamModel names match SamVisionModel's
                         ("prompt_encoder.", "mask_decoder.", "shared_image_embedding."))
