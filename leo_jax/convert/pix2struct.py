"""Conversion tables for Pix2Struct's vision encoder: transformers `Pix2StructVisionModel` checkpoints
(model_type 'pix2struct_vision_model'), and the encoder of `Pix2StructForConditionalGeneration` ones (model_type
'pix2struct', the published google/pix2struct-* files: tensors under 'encoder.', config in `vision_config`; the text
decoder is not part of leo_jax and is skipped on import, and export writes the encoder's tensors only)."""

from __future__ import annotations

from leo_jax.convert.core import ConversionError, Family, Rule, copy, linear, register, transformers_config_writer
from leo_jax.convert.vit import activation_from_hf, activation_to_hf, linear_with_bias, require_fields, require_values
from leo_jax.models.vision.pix2struct import Pix2StructVisionConfig, Pix2StructVisionEncoder

WHAT = "a Pix2Struct vision encoder"


def config_from_hf(hf: dict) -> Pix2StructVisionConfig:
    require_fields(hf, ("hidden_size", "patch_embed_hidden_size", "d_ff", "d_kv", "num_hidden_layers",
                        "num_attention_heads"), WHAT)
    require_values(hf, {"attention_dropout": 0.0, "dropout_rate": 0.0}, WHAT)
    seq_len = hf.get("seq_len", 4096)
    return Pix2StructVisionConfig(
        hidden_size=hf["hidden_size"], patch_embed_hidden_size=hf["patch_embed_hidden_size"], d_ff=hf["d_ff"],
        d_kv=hf["d_kv"], num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        hidden_act=activation_from_hf(hf.get("dense_act_fn", "gelu_new"), "dense_act_fn"),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)), seq_len=seq_len, max_patches=seq_len,
        initializer_range=float(hf.get("initializer_range", 0.02)), dtype="float32", param_dtype="float32")


def config_to_hf(cfg: Pix2StructVisionConfig, original: dict) -> dict:
    hf = dict(original)
    hf.update(hidden_size=cfg.hidden_size, patch_embed_hidden_size=cfg.patch_embed_hidden_size, d_ff=cfg.d_ff,
              d_kv=cfg.d_kv, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              dense_act_fn=activation_to_hf(cfg.hidden_act, original.get("dense_act_fn")),
              layer_norm_eps=cfg.layer_norm_eps, seq_len=cfg.seq_len, model_type="pix2struct_vision_model")
    hf.setdefault("architectures", ["Pix2StructVisionModel"])
    return hf


def full_config_from_hf(hf: dict) -> Pix2StructVisionConfig:
    if not isinstance(hf.get("vision_config"), dict):
        raise ConversionError("config.json (model_type 'pix2struct') has no 'vision_config' object")
    return config_from_hf(hf["vision_config"])


def full_config_to_hf(cfg: Pix2StructVisionConfig, original: dict) -> dict:
    hf = dict(original, model_type="pix2struct")
    vision = original.get("vision_config", {})
    hf["vision_config"] = config_to_hf(cfg, vision)
    if "architectures" not in vision:
        hf["vision_config"].pop("architectures")
    hf.setdefault("architectures", ["Pix2StructForConditionalGeneration"])
    return hf


def rules(cfg: Pix2StructVisionConfig, prefix: str = "") -> list[Rule]:
    """Rules for tensor names under `prefix` ('' for Pix2StructVisionModel, 'encoder.' inside the full model)."""
    L, p = tuple(range(cfg.num_layers)), prefix + "encoder.layer.{i}."
    out = [*linear_with_bias(prefix + "embeddings.patch_projection", "patch_projection", None),
           copy(prefix + "embeddings.row_embedder.weight", "row_embedding"),
           copy(prefix + "embeddings.column_embedder.weight", "column_embedding"),
           copy(prefix + "layernorm.weight", "final_norm/scale"),
           copy(p + "pre_attention_layer_norm.weight", "layers/attn_norm/scale", L),
           copy(p + "pre_mlp_layer_norm.weight", "layers/mlp_norm/scale", L),
           linear(p + "attention.output.weight", "layers/attn/o_proj/kernel", n_in=2, layers=L)]
    for hf, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out.append(linear(p + f"attention.{hf}.weight", f"layers/attn/{ours}/kernel", layers=L))
    for name in ("wi_0", "wi_1", "wo"):
        out.append(linear(p + f"mlp.{name}.weight", f"layers/{name}/kernel", layers=L))
    return out


PIX2STRUCT = register(Family(
    name="pix2struct_vision", model_types=("pix2struct_vision_model",), config_cls=Pix2StructVisionConfig,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, build=Pix2StructVisionEncoder, rules=rules,
    write_config=transformers_config_writer("Pix2StructVisionConfig")))
PIX2STRUCT_FULL = register(Family(
    name="pix2struct", model_types=("pix2struct",), config_cls=Pix2StructVisionConfig,
    config_from_hf=full_config_from_hf, config_to_hf=full_config_to_hf, build=Pix2StructVisionEncoder,
    rules=lambda cfg: rules(cfg, "encoder."), ignored_hf=("decoder.",),
    write_config=transformers_config_writer("Pix2StructConfig")))
