"""Conversion table for ConvNeXt (model_type 'convnext'): transformers `ConvNextModel` checkpoints, and the
backbone of `ConvNextForImageClassification` ones (the published facebook/convnext-* files; tensors under
'convnext.', the classifier is not part of the encoder and is skipped)."""

from __future__ import annotations

import dataclasses

from leo_jax.convert.core import ConversionError, Family, Rule, conv, copy, linear, register, transformers_config_writer
from leo_jax.convert.vit import single_int
from leo_jax.models.vision.convnext import ConvNext, ConvNextConfig

_ARCH_FIELDS = ("hidden_sizes", "depths", "num_channels", "patch_size", "hidden_act", "layer_scale_init_value",
                "layer_norm_eps", "drop_path_rate", "initializer_range", "image_size")


def config_from_hf(hf: dict) -> ConvNextConfig:
    missing = [k for k in ("hidden_sizes", "depths") if k not in hf]
    if missing:
        raise ConversionError(f"config.json lacks field(s) {missing} needed to build ConvNeXt")
    stages = hf.get("num_stages", len(hf["depths"]))
    if stages != len(hf["depths"]) or stages != len(hf["hidden_sizes"]):
        raise ConversionError(f"config.json: num_stages={stages} but depths={hf['depths']} and "
                              f"hidden_sizes={hf['hidden_sizes']}")
    defaults = ConvNextConfig()
    classifier = "ConvNextForImageClassification" in hf.get("architectures", [])
    return ConvNextConfig(
        hidden_sizes=tuple(hf["hidden_sizes"]), depths=tuple(hf["depths"]),
        num_channels=hf.get("num_channels", 3), patch_size=single_int(hf.get("patch_size", 4), "patch_size"),
        hidden_act=hf.get("hidden_act", defaults.hidden_act),
        layer_scale_init_value=float(hf.get("layer_scale_init_value", defaults.layer_scale_init_value)),
        layer_norm_eps=float(hf.get("layer_norm_eps", defaults.layer_norm_eps)),
        drop_path_rate=float(hf.get("drop_path_rate", 0.0)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        image_size=single_int(hf.get("image_size", 224), "image_size"),
        checkpoint_prefix="convnext." if classifier else "", dtype="float32", param_dtype="float32")


def config_to_hf(cfg: ConvNextConfig, original: dict) -> dict:
    hf = dict(original)
    hf.update({k: getattr(cfg, k) for k in _ARCH_FIELDS})
    hf.update(hidden_sizes=list(cfg.hidden_sizes), depths=list(cfg.depths), num_stages=len(cfg.depths),
              model_type="convnext")
    hf.setdefault("architectures", ["ConvNextForImageClassification" if cfg.checkpoint_prefix else "ConvNextModel"])
    return hf


def rules(cfg: ConvNextConfig) -> list[Rule]:
    return [dataclasses.replace(rule, hf=tuple(cfg.checkpoint_prefix + n for n in rule.hf)) for rule in _rules(cfg)]


def _rules(cfg: ConvNextConfig) -> list[Rule]:
    out = [conv("embeddings.patch_embeddings.weight", "stem/kernel"),
           copy("embeddings.patch_embeddings.bias", "stem/bias"),
           copy("embeddings.layernorm.weight", "stem_norm/scale"),
           copy("embeddings.layernorm.bias", "stem_norm/bias"),
           copy("layernorm.weight", "pool_norm/scale"),
           copy("layernorm.bias", "pool_norm/bias")]
    for s, depth in enumerate(cfg.depths):
        hf, jx = f"encoder.stages.{s}.", f"stages/{s}/"
        if s > 0:
            out += [copy(hf + "downsampling_layer.0.weight", jx + "downsample_norm/scale"),
                    copy(hf + "downsampling_layer.0.bias", jx + "downsample_norm/bias"),
                    conv(hf + "downsampling_layer.1.weight", jx + "downsample/kernel"),
                    copy(hf + "downsampling_layer.1.bias", jx + "downsample/bias")]
        L, hf, jx = tuple(range(depth)), hf + "layers.{i}.", jx + "blocks/"
        out += [conv(hf + "dwconv.weight", jx + "dwconv/kernel", L),
                copy(hf + "dwconv.bias", jx + "dwconv/bias", L),
                copy(hf + "layernorm.weight", jx + "norm/scale", L),
                copy(hf + "layernorm.bias", jx + "norm/bias", L),
                linear(hf + "pwconv1.weight", jx + "pwconv1/kernel", layers=L),
                copy(hf + "pwconv1.bias", jx + "pwconv1/bias", L),
                linear(hf + "pwconv2.weight", jx + "pwconv2/kernel", layers=L),
                copy(hf + "pwconv2.bias", jx + "pwconv2/bias", L)]
        if cfg.layer_scale_init_value > 0:
            out.append(copy(hf + "layer_scale_parameter", jx + "layer_scale", L))
    return out


CONVNEXT = register(Family(
    name="convnext", model_types=("convnext",), config_cls=ConvNextConfig, config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, build=ConvNext, rules=rules, ignored_hf=("classifier.",),
    write_config=transformers_config_writer("ConvNextConfig", derived=("stage_names",))))
