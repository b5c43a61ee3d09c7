"""Conversion helpers shared by the ViT encoder tables (CLIP, SigLIP, InternViT, SAM): activation names, the
rules of one pre-LN block, fused-qkv splitting, config.json field checks, and families for the vision tower of a
full checkpoint (CLIPModel, SiglipModel, SamModel)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from leo_jax.convert.core import ConversionError, Family, Rule, copy, linear, register, transformers_config_writer

# transformers' ACT2FN names -> leo_jax.layers.mlp.ACTIVATIONS names (first entry per target = export name).
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "relu": "relu", "silu": "silu"}


def activation_from_hf(name: str, field: str = "hidden_act") -> str:
    if name not in HF_ACTIVATIONS:
        raise ConversionError(f"config.json: {field}={name!r} is not supported; use one of {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def activation_to_hf(name: str, original: str | None) -> str:
    """The HF name for a leo_jax activation, keeping the original file's spelling when it means the same."""
    if original is not None and HF_ACTIVATIONS.get(original) == name:
        return original
    return next(hf for hf, ours in HF_ACTIVATIONS.items() if ours == name)


def require_fields(hf: dict, names: tuple[str, ...], what: str) -> None:
    missing = [n for n in names if n not in hf]
    if missing:
        raise ConversionError(f"config.json lacks field(s) {missing} needed to build {what}")


def require_values(hf: dict, expected: dict[str, Any], what: str) -> None:
    """Fields whose other values leo_jax does not implement: a clear error instead of silently wrong outputs."""
    for key, value in expected.items():
        if key in hf and hf[key] != value:
            raise ConversionError(f"config.json: {key}={hf[key]!r} is not supported by the leo_jax {what} "
                                  f"(only {value!r})")


def single_int(value: Any, field: str) -> int:
    """An int from `value` or a square [n, n] pair (InternVL, SAM write lists)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"config.json: non-square {field}={list(value)} is not supported")
        value = value[0]
    return int(value)


def fused_qkv(hf: str, attn: str, layers, bias: bool = False) -> Rule:
    """torch fused qkv [3 * H * hd, E] (bias [3 * H * hd]; q, k, v stacked in that order) <-> the q/k/v kernels
    [E, H, hd] (biases [H, hd]) of leo_jax.layers.attention.Attention at path `attn`."""
    paths = tuple(f"{attn}/{n}_proj/{'bias' if bias else 'kernel'}" for n in "qkv")

    def to_jax(arrays, shapes):
        return [(p if bias else p.T).reshape(s) for p, s in zip(np.split(arrays[0], 3, axis=0), shapes)]

    def to_hf(arrays):
        return [np.concatenate([a.reshape(-1) if bias else a.reshape(a.shape[0], -1).T for a in arrays], axis=0)]

    return Rule((hf,), paths, to_jax, to_hf, layers)


def linear_with_bias(hf: str, jax_path: str, layers, n_in: int = 1, flatten: bool = False) -> list[Rule]:
    """`hf`.weight/.bias <-> `jax_path`/kernel/bias."""
    return [linear(f"{hf}.weight", f"{jax_path}/kernel", n_in=n_in, layers=layers),
            copy(f"{hf}.bias", f"{jax_path}/bias", layers, flatten=flatten)]


def norm(hf: str, jax_path: str, layers=None, use_bias: bool = True) -> list[Rule]:
    """LayerNorm weight/bias <-> scale/bias."""
    rules = [copy(f"{hf}.weight", f"{jax_path}/scale", layers)]
    return rules + ([copy(f"{hf}.bias", f"{jax_path}/bias", layers)] if use_bias else [])


def vit_block_rules(prefix: str, layers, names: dict[str, str], qkv_bias: bool = True,
                    stack: str = "layers") -> list[Rule]:
    """Rules of a stacked pre-LN block (leo_jax paths '<stack>/norm1', '<stack>/attn/q_proj', '<stack>/mlp/fc1',
    ...) from HF names under `prefix` ('...{i}.'). `names` gives the HF module for each of norm1, norm2, q, k, v,
    o, fc1, fc2 (q/k/v may be absent: then the caller maps a fused qkv) and optionally ls1, ls2 (layer scale)."""
    rules = norm(prefix + names["norm1"], f"{stack}/norm1", layers) + norm(prefix + names["norm2"],
                                                                            f"{stack}/norm2", layers)
    for role in ("q", "k", "v"):
        if role in names:
            hf, path = prefix + names[role], f"{stack}/attn/{role}_proj"
            rules += linear_with_bias(hf, path, layers, flatten=True) if qkv_bias else [
                linear(f"{hf}.weight", f"{path}/kernel", layers=layers)]
    rules += linear_with_bias(prefix + names["o"], f"{stack}/attn/o_proj", layers, n_in=2)
    rules += linear_with_bias(prefix + names["fc1"], f"{stack}/mlp/fc1", layers)
    rules += linear_with_bias(prefix + names["fc2"], f"{stack}/mlp/fc2", layers)
    for role in ("ls1", "ls2"):
        if role in names:
            rules.append(copy(prefix + names[role], f"{stack}/{role}", layers))
    return rules


CLIP_BLOCK_NAMES = dict(norm1="layer_norm1", norm2="layer_norm2", q="self_attn.q_proj", k="self_attn.k_proj",
                        v="self_attn.v_proj", o="self_attn.out_proj", fc1="mlp.fc1", fc2="mlp.fc2")


def tower_family(base: Family, name: str, model_type: str, prefix: str, config_class: str,
                 ignored: tuple[str, ...]) -> Family:
    """Registers a family for the vision tower of a full checkpoint (e.g. CLIPModel, model_type 'clip', as
    published for openai/clip-vit-large-patch14-336): the base family's tensors under `prefix`, its config from
    config.json's 'vision_config'. Tensors outside the tower (text tower, projections, SAM's prompt encoder and
    mask decoder: substrings `ignored`) are skipped on import. Export writes the tower alone, under the same names,
    with the full config: what `<Base>VisionModel.from_pretrained` reads, as from the published checkpoint."""

    def config_from_hf(hf: dict):
        if not isinstance(hf.get("vision_config"), dict):
            raise ConversionError(f"config.json (model_type {model_type!r}) has no 'vision_config' object")
        import transformers

        vision_class = getattr(transformers, config_class).sub_configs["vision_config"]
        fields = {k: v for k, v in hf["vision_config"].items() if k not in ("model_type", "transformers_version")}
        return base.config_from_hf(vision_class(**fields).to_dict())  # fills the fields left at their defaults

    def config_to_hf(cfg, original: dict) -> dict:
        vision = base.config_to_hf(cfg, dict(original.get("vision_config", {})))
        vision.pop("architectures", None)  # a sub-config names no model class
        return {**original, "model_type": model_type, "vision_config": vision}

    def rules(cfg) -> list[Rule]:
        return [dataclasses.replace(r, hf=tuple(prefix + n for n in r.hf)) for r in base.rules(cfg)]


    return register(dataclasses.replace(
        base, name=name, model_types=(model_type,), config_from_hf=config_from_hf, config_to_hf=config_to_hf,
        rules=rules, ignored_hf=base.ignored_hf + ignored, write_config=transformers_config_writer(config_class)))
