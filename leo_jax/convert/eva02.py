"""Conversion table for EVA-02: timm-layout safetensors of the `Eva` vision tower (no transformers model exists).

A directory holds `model.safetensors` with timm's names and a `config.json` that is either
- leo-written (model_type 'eva02') with timm's `Eva` arguments (img_size, patch_size, embed_dim, depth, num_heads,
  mlp_ratio, qkv_fused, scale_mlp, scale_attn_inner, ref_feat_shape, global_pool), or
- a timm hub config.json ({"architecture": "eva02_large_patch14_448.mim_m38m_ft_in1k", ...}) of one of the
  registered EVA-02 models in TIMM_ARCHS (pass `--family eva02`: such files have no model_type). The EVA02-CLIP
  towers are published as open_clip `.bin` files: save their `visual.trunk.` tensors, prefix removed, as
  model.safetensors next to such a config.json.
The tower is converted; a classifier / CLIP-projection `head` and the `fc_norm` of 'avg'-pooled models are not
part of it and are skipped on import.
"""

from __future__ import annotations

import numpy as np

from leo_jax.convert.core import ConversionError, Family, Rule, conv, copy, linear, register
from leo_jax.convert.vit import fused_qkv, linear_with_bias, norm
from leo_jax.models.vision.eva02 import EVA02Config, EVA02VisionEncoder

_EVA02 = dict(patch_size=14, mlp_ratio=4 * 2 / 3, ref_feat_shape=[16, 16], global_pool="avg")
_TINY, _SMALL = dict(_EVA02, embed_dim=192, depth=12, num_heads=3), dict(_EVA02, embed_dim=384, depth=12, num_heads=6)
_BASE = dict(_EVA02, embed_dim=768, depth=12, num_heads=12, qkv_fused=False, scale_mlp=True)
_LARGE = dict(_EVA02, embed_dim=1024, depth=24, num_heads=16, qkv_fused=False, scale_mlp=True)
_CLIP = dict(scale_attn_inner=True, global_pool="token")
# timm's registered EVA-02 models (timm/models/eva.py): the Eva arguments a hub config.json does not carry.
TIMM_ARCHS = {
    "eva02_tiny_patch14_224": dict(_TINY, img_size=224), "eva02_tiny_patch14_336": dict(_TINY, img_size=336),
    "eva02_small_patch14_224": dict(_SMALL, img_size=224), "eva02_small_patch14_336": dict(_SMALL, img_size=336),
    "eva02_base_patch14_224": dict(_BASE, img_size=224), "eva02_base_patch14_448": dict(_BASE, img_size=448),
    "eva02_large_patch14_224": dict(_LARGE, img_size=224), "eva02_large_patch14_448": dict(_LARGE, img_size=448),
    "eva02_base_patch16_clip_224": dict(_BASE, **_CLIP, img_size=224, patch_size=16),
    "eva02_large_patch14_clip_224": dict(_LARGE, **_CLIP, img_size=224),
    "eva02_large_patch14_clip_336": dict(_LARGE, **_CLIP, img_size=336),
}
_REQUIRED = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
# Eva arguments whose other values leo_jax does not implement.
_FIXED = dict(qkv_bias=True, class_token=True, use_abs_pos_emb=True, use_rot_pos_emb=True, swiglu_mlp=True,
              num_reg_tokens=0, init_values=None, use_post_norm=False, attn_head_dim=None, dynamic_img_size=False)


def _pair(value, field: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ConversionError(f"config.json: {field}={value!r} must be an int or [height, width]")
    return int(pair[0]), int(pair[1])


def _eva_args(hf: dict) -> dict:
    if all(k in hf for k in _REQUIRED):
        return hf
    arch = str(hf.get("architecture", "")).split(".")[0]
    if arch in TIMM_ARCHS:
        return {**TIMM_ARCHS[arch], **{k: v for k, v in hf.items() if k in ("img_size", "global_pool")}}
    missing = [k for k in _REQUIRED if k not in hf]
    raise ConversionError(f"config.json lacks timm Eva field(s) {missing} and its architecture {arch or None!r} is "
                          f"not one of {sorted(TIMM_ARCHS)}; write those fields (see leo_jax/convert/eva02.py)")


def config_from_hf(hf: dict) -> EVA02Config:
    args = _eva_args(hf)
    for key, value in _FIXED.items():
        if args.get(key, value) != value:
            raise ConversionError(f"config.json: {key}={args[key]!r} is not supported by the leo_jax EVA-02 "
                                  f"(only {value!r})")
    ref = args.get("ref_feat_shape")
    dim = int(args["embed_dim"])
    return EVA02Config(
        hidden_size=dim, intermediate_size=int(dim * float(args["mlp_ratio"])), num_layers=int(args["depth"]),
        num_heads=int(args["num_heads"]), patch_size=int(args["patch_size"]),
        image_size=_pair(args["img_size"], "img_size"), num_channels=int(args.get("in_chans", 3)),
        scale_attn_inner=bool(args.get("scale_attn_inner", False)), scale_mlp=bool(args.get("scale_mlp", False)),
        rope_ref_grid=None if ref is None else _pair(ref, "ref_feat_shape"),
        final_norm=args.get("global_pool", "avg") != "avg", qkv_fused=bool(args.get("qkv_fused", True)),
        dtype="float32", param_dtype="float32")


def config_to_hf(cfg: EVA02Config, original: dict) -> dict:
    hf = dict(original)
    ratio = float(original.get("mlp_ratio", 0.0))
    if int(cfg.hidden_size * ratio) != cfg.intermediate_size:
        ratio = cfg.intermediate_size / cfg.hidden_size
    hf.update(model_type="eva02", img_size=list(cfg.image_size), patch_size=cfg.patch_size,
              in_chans=cfg.num_channels, embed_dim=cfg.hidden_size, depth=cfg.num_layers, num_heads=cfg.num_heads,
              mlp_ratio=ratio, qkv_fused=cfg.qkv_fused, scale_mlp=cfg.scale_mlp,
              scale_attn_inner=cfg.scale_attn_inner, use_rot_pos_emb=True, swiglu_mlp=True,
              ref_feat_shape=None if cfg.rope_ref_grid is None else list(cfg.rope_ref_grid),
              global_pool="token" if cfg.final_norm else "avg", num_classes=0)
    return hf


def _squeeze_leading(hf: str, jax_path: str) -> Rule:
    """timm's [1, 1, D] cls_token / [1, N, D] pos_embed <-> [D] / [N, D]."""
    return Rule((hf,), (jax_path,), lambda a, shapes: [a[0].reshape(shapes[0])],
                lambda a: [a[0].reshape((1,) * (3 - a[0].ndim) + a[0].shape)])


def _packed_fc1(hf: str, leaf: str, layers) -> Rule:
    """GluMlp's fc1 weight [2F, D] (bias [2F]), gate rows first, <-> the fc1_g / fc1_x kernels [D, F] (biases [F])."""
    kernel = leaf == "kernel"

    def to_jax(arrays, shapes):
        return [(half.T if kernel else half).reshape(s) for half, s in zip(np.split(arrays[0], 2, axis=0), shapes)]

    def to_hf(arrays):
        return [np.concatenate([a.T if kernel else a for a in arrays], axis=0)]

    return Rule((hf,), (f"layers/mlp/fc1_g/{leaf}", f"layers/mlp/fc1_x/{leaf}"), to_jax, to_hf, layers)


def rules(cfg: EVA02Config) -> list[Rule]:
    L, p = tuple(range(cfg.num_layers)), "blocks.{i}."
    out = [conv("patch_embed.proj.weight", "patch_embed/kernel"), copy("patch_embed.proj.bias", "patch_embed/bias"),
           _squeeze_leading("cls_token", "cls_token"), _squeeze_leading("pos_embed", "pos_embed"),
           *norm(p + "norm1", "layers/norm1", L), *norm(p + "norm2", "layers/norm2", L),
           *linear_with_bias(p + "attn.proj", "layers/attn/o_proj", L, n_in=2),
           *linear_with_bias(p + "mlp.fc2", "layers/mlp/fc2", L)]
    if cfg.scale_mlp:  # timm SwiGLU: separate gate / value projections and a norm
        out += [*linear_with_bias(p + "mlp.fc1_g", "layers/mlp/fc1_g", L),
                *linear_with_bias(p + "mlp.fc1_x", "layers/mlp/fc1_x", L), *norm(p + "mlp.norm", "layers/mlp/norm", L)]
    else:  # timm GluMlp(gate_last=False): one packed fc1 [gate; value]
        out += [_packed_fc1(p + "mlp.fc1.weight", "kernel", L), _packed_fc1(p + "mlp.fc1.bias", "bias", L)]
    if cfg.qkv_fused:
        out += [fused_qkv(p + "attn.qkv.weight", "layers/attn", L),
                copy(p + "attn.q_bias", "layers/attn/q_proj/bias", L, flatten=True),
                copy(p + "attn.v_bias", "layers/attn/v_proj/bias", L, flatten=True)]
    else:
        out += [*linear_with_bias(p + "attn.q_proj", "layers/attn/q_proj", L, flatten=True),
                linear(p + "attn.k_proj.weight", "layers/attn/k_proj/kernel", layers=L),
                *linear_with_bias(p + "attn.v_proj", "layers/attn/v_proj", L, flatten=True)]
    if cfg.scale_attn_inner:
        out += norm(p + "attn.norm", "layers/attn/inner_norm", L)
    if cfg.final_norm:
        out += norm("norm", "norm")
    return out


EVA02 = register(Family(
    name="eva02", model_types=("eva02",), config_cls=EVA02Config, config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, build=EVA02VisionEncoder, rules=rules, ignored_hf=("head.", "fc_norm.")))
