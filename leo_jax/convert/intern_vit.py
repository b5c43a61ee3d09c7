"""Conversion tables for InternViT, both checkpoint layouts of the same weights:

- 'intern_vit': transformers `InternVLVisionModel` (model_type 'internvl_vision'; separate q/k/v, lambda_1/2).
- 'intern_vit_original': the OpenGVLab release (model_type 'intern_vit_6b', InternVisionModel with remote code;
  fused `attn.qkv` [q; k; v], `ls1`/`ls2`, `norm1`/`norm2`).

Options of those configs that leo_jax does not implement (the InternViT-6B ones: RMSNorm, q/k-norm; HF's final
LayerNorm when use_mean_pooling=False; the mask token; dropout) are clear errors.
"""

from __future__ import annotations

from leo_jax.convert.core import Family, Rule, conv, copy, register, transformers_config_writer
from leo_jax.convert.vit import (
    activation_from_hf,
    activation_to_hf,
    fused_qkv,
    require_fields,
    require_values,
    single_int,
    vit_block_rules,
)
from leo_jax.models.vision.intern_vit import InternViT, InternViTConfig

_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size")
_WHAT = "InternViT encoder (the 300M architecture)"


def _common(cfg: InternViTConfig, original: dict) -> dict:
    hf = dict(original)
    hf.update(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_channels=cfg.num_channels, layer_norm_eps=cfg.layer_norm_eps,
              hidden_act=activation_to_hf(cfg.hidden_act, original.get("hidden_act")))
    return hf


# ---- transformers InternVLVisionModel ----------------------------------------------------------------------------

def hf_config_from_hf(hf: dict) -> InternViTConfig:
    require_fields(hf, _FIELDS, "an InternVL vision encoder")
    require_values(hf, {"use_qk_norm": False, "norm_type": "layer_norm", "use_mean_pooling": True,
                        "use_mask_token": False, "use_absolute_position_embeddings": True, "attention_dropout": 0.0,
                        "projection_dropout": 0.0, "hidden_dropout_prob": 0.0}, _WHAT)
    return InternViTConfig(
        hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], patch_size=single_int(hf["patch_size"], "patch_size"),
        image_size=single_int(hf["image_size"], "image_size"), num_channels=hf.get("num_channels", 3),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
        hidden_act=activation_from_hf(hf.get("hidden_act", "gelu")), qkv_bias=bool(hf.get("attention_bias", False)),
        layer_scale_init=float(hf.get("layer_scale_init_value", 0.1)), dtype="float32", param_dtype="float32")


def hf_config_to_hf(cfg: InternViTConfig, original: dict) -> dict:
    hf = _common(cfg, original)
    hf.update(patch_size=[cfg.patch_size] * 2, image_size=[cfg.image_size] * 2, attention_bias=cfg.qkv_bias,
              layer_scale_init_value=cfg.layer_scale_init, use_qk_norm=False, norm_type="layer_norm",
              use_mean_pooling=True, model_type="internvl_vision")
    hf.setdefault("architectures", ["InternVLVisionModel"])
    return hf


def hf_rules(cfg: InternViTConfig) -> list[Rule]:
    names = dict(norm1="layernorm_before", norm2="layernorm_after", q="attention.q_proj", k="attention.k_proj",
                 v="attention.v_proj", o="attention.projection_layer", fc1="mlp.fc1", fc2="mlp.fc2", ls1="lambda_1",
                 ls2="lambda_2")
    return [conv("embeddings.patch_embeddings.projection.weight", "patch_embed/kernel"),
            copy("embeddings.patch_embeddings.projection.bias", "patch_embed/bias"),
            copy("embeddings.cls_token", "class_embedding"),
            copy("embeddings.position_embeddings", "position_embedding"),
            *vit_block_rules("encoder.layer.{i}.", tuple(range(cfg.num_layers)), names, qkv_bias=cfg.qkv_bias)]


INTERN_VIT = register(Family(
    name="intern_vit", model_types=("internvl_vision",), config_cls=InternViTConfig,
    config_from_hf=hf_config_from_hf, config_to_hf=hf_config_to_hf, build=InternViT, rules=hf_rules,
    write_config=transformers_config_writer("InternVLVisionConfig")))


# ---- original OpenGVLab layout -----------------------------------------------------------------------------------

def original_config_from_hf(hf: dict) -> InternViTConfig:
    require_fields(hf, _FIELDS, "an InternViT encoder")
    require_values(hf, {"qk_normalization": False, "norm_type": "layer_norm", "attention_dropout": 0.0,
                        "dropout": 0.0}, _WHAT)
    return InternViTConfig(
        hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], patch_size=int(hf["patch_size"]), image_size=int(hf["image_size"]),
        num_channels=hf.get("num_channels", 3), layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
        hidden_act=activation_from_hf(hf.get("hidden_act", "gelu")), qkv_bias=bool(hf.get("qkv_bias", True)),
        layer_scale_init=float(hf.get("initializer_factor", 1.0)), drop_path_rate=float(hf.get("drop_path_rate", 0.0)),
        dtype="float32", param_dtype="float32")


def original_config_to_hf(cfg: InternViTConfig, original: dict) -> dict:
    hf = _common(cfg, original)
    hf.update(patch_size=cfg.patch_size, image_size=cfg.image_size, qkv_bias=cfg.qkv_bias, qk_normalization=False,
              norm_type="layer_norm", initializer_factor=cfg.layer_scale_init, drop_path_rate=cfg.drop_path_rate,
              model_type="intern_vit_6b")
    hf.setdefault("architectures", ["InternVisionModel"])
    hf.setdefault("auto_map", {"AutoConfig": "configuration_intern_vit.InternVisionConfig",
                               "AutoModel": "modeling_intern_vit.InternVisionModel"})
    return hf


def original_rules(cfg: InternViTConfig) -> list[Rule]:
    layers, p = tuple(range(cfg.num_layers)), "encoder.layers.{i}."
    names = dict(norm1="norm1", norm2="norm2", o="attn.proj", fc1="mlp.fc1", fc2="mlp.fc2", ls1="ls1", ls2="ls2")
    rules = [conv("embeddings.patch_embedding.weight", "patch_embed/kernel"),
             copy("embeddings.patch_embedding.bias", "patch_embed/bias"),
             copy("embeddings.class_embedding", "class_embedding"),
             copy("embeddings.position_embedding", "position_embedding"),
             *vit_block_rules(p, layers, names),
             fused_qkv(p + "attn.qkv.weight", "layers/attn", layers)]
    return rules + ([fused_qkv(p + "attn.qkv.bias", "layers/attn", layers, bias=True)] if cfg.qkv_bias else [])


INTERN_VIT_ORIGINAL = register(Family(
    name="intern_vit_original", model_types=("intern_vit_6b",), config_cls=InternViTConfig,
    config_from_hf=original_config_from_hf, config_to_hf=original_config_to_hf, build=InternViT,
    rules=original_rules))  # InternVisionModel is remote code: config.json is plain JSON
