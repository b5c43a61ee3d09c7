"""Whole-model conversion for LEO in the layout of the official LEO code (github.com/Mozhgan91/LEO, `LeoModel` in
leo/model/leo_chat/modeling_leo_chat.py, config `LeoConfig` with model_type 'hybrid_chat'):

- `vision_model_1.*`  InternViT in the original OpenGVLab layout (fused `attn.qkv`, `ls1`/`ls2`, `norm1`/`norm2`),
- `vision_model_2.*`  the SAM image encoder. LEO's `SAMModel(config).vision_encoder` uses the same module names as
  transformers' `SamVisionEncoder` (`patch_embed.projection`, `pos_embed`, `layers.{i}.attn.qkv`, `neck.conv1`,
  ...), so these are the transformers SAM table's names with 'vision_encoder.' replaced by 'vision_model_2.',
- `mlp1.*` / `mlp2.*` the two projectors (LayerNorm, Linear, GELU, Linear: `nn.Sequential` indices 0, 1, 3),
- `language_model.*`  the LLM as the official code names it: InternLM2ForCausalLM (`model.tok_embeddings`,
  `model.layers.{i}.attention.wqkv`, `feed_forward.w1/w2/w3`, `output`), or Llama/Qwen2ForCausalLM names.

config.json is the official `LeoConfig.to_dict()` (vision_config_1, vision_config_2, llm_config, downsample_ratio,
downsample_ratio2, ps_version, select_layer, template, system_message, ...) with every field the official code reads
written out (`use_flash_attn` False: flash-attn asserts on fp32 inputs; InternLM2 `attn_implementation` 'eager';
drop-path and dropout rates), plus `img_context_token_id` and the complete leo_jax model config under "leo_jax", so
importing rebuilds the identical model. `upstream_problems` lists what keeps the official code from building an
exported config (it sizes mlp2's input as mlp1's, takes only InternLM2 / Phi-3 LLMs, ...). A config.json without
"leo_jax" (an official LEO checkpoint) is read from the official fields alone. `leo_jax.pytorch.leo.LeoModel` loads
the exported directory with `load_state_dict(strict=True)`.

`export_components` writes each part as its own Hugging Face directory (LLM, InternViT as transformers
InternVLVisionModel, SAM as transformers SamVisionModel).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from leo_jax.convert import intern_vit, llm, sam
from leo_jax.convert.api import export_module
from leo_jax.convert.core import ConversionError, Family, Rule, prefixed, register
from leo_jax.convert.vit import linear_with_bias, norm
from leo_jax.data import templates
from leo_jax.models.leo import Leo, LeoConfig
from leo_jax.models.projector import ProjectorOptions, torch_projector_names

MODEL_TYPE = "hybrid_chat"  # the official LeoConfig.model_type
LEO_JAX_KEY = "leo_jax"
# official llm_config.architectures[0] <-> leo_jax LLM family (and its convert table)
LLM_ARCHITECTURES = {"InternLM2ForCausalLM": "internlm2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
LLM_RULES = {"internlm2": llm.internlm2_rules, "llama": llm.llama_rules, "qwen2": llm.llama_rules}
# official defaults of the LEO-8B release config that leo_jax keeps outside the model config (tiling, template)
OFFICIAL_DEFAULTS = dict(template="internlm2-chat", system_message=templates.LEO_SYSTEM_PROMPT, dynamic_image_size=True,
                         use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=6, pad2square=False,
                         use_backbone_lora=0, use_llm_lora=0)
# official conversation templates for each official LLM architecture (LeoConfig builds only these two)
UPSTREAM_TEMPLATES = {"InternLM2ForCausalLM": ("internlm2-chat", "Hermes-2"), "Phi3ForCausalLM": ("phi3-chat",)}


def _check_official_projector(cfg: LeoConfig) -> None:
    projector = cfg.projector
    if not projector.layer_norm or projector.act != "gelu" or projector.norm_eps != 1e-5:
        raise ConversionError(f"config.model.projector={dataclasses.asdict(projector)}: the official LEO layout has "
                              f"LayerNorm(eps 1e-5) -> Linear -> GELU -> Linear projectors (layer_norm=True, "
                              f"act='gelu')")


# ---- config.json ---------------------------------------------------------------------------------------------------

def config_to_hf(cfg: LeoConfig, original: dict) -> dict:
    """Official LeoConfig fields (taken from `original` where it has them) + img_context_token_id + "leo_jax"."""
    intern_cfg, llm_cfg = cfg.intern_vit, cfg.llm
    hf = {**OFFICIAL_DEFAULTS, **original}
    vision_2 = sam.config_to_hf(cfg.sam, dict(original.get("vision_config_2", {})))
    vision_2.pop("architectures", None)  # LEO's SAM is a bare SamVisionEncoder, not a SamVisionModel
    vision_2.update(attention_dropout=0.0, mlp_ratio=cfg.sam.mlp_dim / cfg.sam.hidden_size)
    vision_1 = intern_vit.original_config_to_hf(intern_cfg, dict(original.get("vision_config_1", {})))
    vision_1.update(use_flash_attn=False, dropout=0.0, attention_dropout=0.0)
    llm_hf = llm._llm_config_to_hf(llm_cfg, dict(original.get("llm_config", {})))
    if llm_cfg.family == "internlm2":
        llm_hf["attn_implementation"] = "eager"
    hf.update(
        model_type=MODEL_TYPE, architectures=["LeoModel"], vision_config_1=vision_1, vision_config_2=vision_2,
        llm_config=llm_hf,
        downsample_ratio=cfg.intern_unshuffle, downsample_ratio2=cfg.sam_unshuffle, ps_version="v2",
        select_layer=intern_cfg.output_layer, force_image_size=intern_cfg.image_size,
        img_context_token_id=cfg.image_context_id, num_image_token=cfg.tokens_per_tile())
    hf[LEO_JAX_KEY] = dataclasses.asdict(cfg)
    return hf


def data_fields(data_config) -> dict:
    """The official fields set from training data options: the conversation template (its official name and
    system message) and the tiling (min/max tiles per image, thumbnail, tile size)."""
    template = templates.get_template(data_config.template)
    leo = data_config.leo
    return dict(template=template.upstream_name or template.name, system_message=template.default_system_prompt or "",
                dynamic_image_size=leo.max_tiles > 1, use_thumbnail=bool(leo.use_thumbnail),
                min_dynamic_patch=int(leo.min_tiles), max_dynamic_patch=int(leo.max_tiles))


def upstream_problems(hf: dict) -> list[str]:
    """What in an exported config.json keeps the official LEO code (`LeoConfig` + `LeoModel`) from building the
    model and running its chat(); [] when nothing does. Each entry names the fields."""
    problems = []
    vision_1, vision_2, llm_hf = (hf.get(k, {}) for k in ("vision_config_1", "vision_config_2", "llm_config"))
    arch = (llm_hf.get("architectures") or ["?"])[0]
    if arch not in UPSTREAM_TEMPLATES:
        problems.append(f"llm_config.architectures[0]={arch!r}: the official LeoConfig builds only "
                        f"{sorted(UPSTREAM_TEMPLATES)} (config.model.llm.family='internlm2')")
    elif hf.get("template") not in UPSTREAM_TEMPLATES[arch]:
        problems.append(f"template={hf.get('template')!r}: the official code has no such conversation template for "
                        f"{arch} (use one of {list(UPSTREAM_TEMPLATES[arch])}; leo_jax: data.template="
                        f"'leo_internlm2_chat')")
    ratio, ratio2 = hf.get("downsample_ratio"), hf.get("downsample_ratio2")
    if not ratio or 1 / ratio != int(1 / ratio):
        problems.append(f"downsample_ratio={ratio}: the official projectors need 1 / downsample_ratio to be an "
                        f"integer")
    else:
        mlp1_in = vision_1["hidden_size"] * int(1 / ratio) ** 2
        mlp2_in = vision_2["output_channels"] * int(ratio2) ** 2
        if mlp1_in != mlp2_in:
            problems.append(
                f"vision_config_2.output_channels={vision_2['output_channels']} x downsample_ratio2={ratio2}^2 = "
                f"{mlp2_in}: the official code sizes mlp2's input as mlp1's, vision_config_1.hidden_size="
                f"{vision_1['hidden_size']} x (1 / downsample_ratio={ratio})^2 = {mlp1_in} (config.model.sam."
                f"output_channels = {mlp1_in // int(ratio2) ** 2} makes them equal)")
        size = hf.get("force_image_size") or vision_1["image_size"]
        num_image_token = int((size // vision_1["patch_size"]) ** 2 * ratio ** 2) * 2
        sam_tokens = 2 * (vision_2["image_size"] // vision_2["patch_size"] // int(ratio2)) ** 2
        if num_image_token != hf.get("num_image_token") or sam_tokens != num_image_token:
            problems.append(f"the official num_image_token ((force_image_size // patch_size)^2 x downsample_ratio^2 "
                            f"x 2 = {num_image_token}) must equal the model's tokens per tile "
                            f"({hf.get('num_image_token')}) and SAM's ({sam_tokens})")
    if hf.get("ps_version") != "v2":
        problems.append(f"ps_version={hf.get('ps_version')!r}: LEO trains with 'v2'")
    if vision_1.get("use_flash_attn") is not False:
        problems.append("vision_config_1.use_flash_attn must be written as false (the official InternViT defaults "
                        "to flash-attn, which asserts on fp32 inputs)")
    context = hf.get("img_context_token_id")
    if not isinstance(context, int) or not 0 <= context < llm_hf.get("vocab_size", 0):
        problems.append(f"img_context_token_id={context!r} is not a token id of the LLM (vocab_size "
                        f"{llm_hf.get('vocab_size')}): it must be the shipped tokenizer's <IMG_CONTEXT> id")
    return problems


def _sub_config(hf: dict, key: str) -> dict:
    if not isinstance(hf.get(key), dict):
        raise ConversionError(f"config.json (model_type {MODEL_TYPE!r}) has no {key!r} object; an official LEO "
                              f"config.json has vision_config_1, vision_config_2 and llm_config")
    return hf[key]


def _config_from_official(hf: dict) -> LeoConfig:
    """LeoConfig from the official fields alone (a checkpoint written by the official LEO code)."""
    vision_1, vision_2, llm_hf = (_sub_config(hf, k) for k in ("vision_config_1", "vision_config_2", "llm_config"))
    if hf.get("ps_version", "v2") != "v2":
        raise ConversionError(f"config.json: ps_version={hf['ps_version']!r} is not supported (only 'v2', the "
                              f"pixel shuffle LEO trains with)")
    arch = (llm_hf.get("architectures") or ["InternLM2ForCausalLM"])[0]
    if arch not in LLM_ARCHITECTURES:
        raise ConversionError(f"config.json: llm_config.architectures[0]={arch!r} is not supported; use one of "
                              f"{sorted(LLM_ARCHITECTURES)}")
    context_id = hf.get("img_context_token_id")  # the official code sets it from the tokenizer at run time
    projector = ProjectorOptions(layer_norm=True, act="gelu", norm_eps=1e-5, dtype="float32", param_dtype="float32")
    try:
        intern_cfg = dataclasses.replace(intern_vit.original_config_from_hf(vision_1),
                                         output_layer=int(hf.get("select_layer", -1)))
        cfg = LeoConfig(intern_vit=intern_cfg, sam=sam.config_from_hf(vision_2),
                        llm=llm._llm_config_from_hf(llm_hf, LLM_ARCHITECTURES[arch]), projector=projector,
                        intern_unshuffle=float(hf.get("downsample_ratio", 0.5)),
                        sam_unshuffle=int(hf.get("downsample_ratio2", 4)),
                        image_context_id=-1 if context_id is None else int(context_id))
    except ConversionError:
        raise
    except ValueError as e:
        raise ConversionError(f"config.json describes no valid LEO model: {e}") from e
    return cfg


def config_from_hf(hf: dict) -> LeoConfig:
    if LEO_JAX_KEY not in hf:
        return _config_from_official(hf)
    try:
        cfg = LeoConfig.from_config(hf[LEO_JAX_KEY], f"config.json:{LEO_JAX_KEY}")
    except ValueError as e:
        raise ConversionError(str(e)) from e
    # the official fields are what PyTorch users read: they must describe the same model
    for field, ours in (("downsample_ratio", cfg.intern_unshuffle), ("downsample_ratio2", cfg.sam_unshuffle)):
        if field in hf and hf[field] != ours:
            raise ConversionError(f"config.json: {field}={hf[field]!r} disagrees with {LEO_JAX_KEY} ({ours!r}); "
                                  f"re-export the model instead of editing one of them")
    return cfg


def with_dtype(cfg: LeoConfig, dtype: str | None, param_dtype: str | None) -> LeoConfig:
    """Compute / storage dtype for every part (encoders, projectors, LLM); None keeps each part's own."""
    changes = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    return dataclasses.replace(cfg, **{part: dataclasses.replace(getattr(cfg, part), **changes)
                                       for part in ("intern_vit", "sam", "llm", "projector")})


# ---- tensor names --------------------------------------------------------------------------------------------------

def _projector_rules(hf_prefix: str, jax_prefix: str) -> list[Rule]:
    index = torch_projector_names(layer_norm=True)
    return [*norm(hf_prefix + index["norm"], jax_prefix + "norm"),
            *linear_with_bias(hf_prefix + index["mlp.fc1"], jax_prefix + "mlp/fc1", None),
            *linear_with_bias(hf_prefix + index["mlp.fc2"], jax_prefix + "mlp/fc2", None)]


def rules(cfg: LeoConfig) -> list[Rule]:
    _check_official_projector(cfg)
    llm_cfg = cfg.llm
    if llm_cfg.family not in LLM_RULES:
        raise ConversionError(f"config.model.llm.family={llm_cfg.family!r} has no official LEO layout; use one of "
                              f"{sorted(LLM_RULES)}")
    sam_rules = [dataclasses.replace(r, hf=tuple(n.removeprefix(sam.PREFIX) for n in r.hf))
                 for r in sam.rules(cfg.sam)]
    return [*prefixed(intern_vit.original_rules(cfg.intern_vit), "vision_model_1.", "intern_vit/"),
            *prefixed(sam_rules, "vision_model_2.", "sam/"),
            *_projector_rules("mlp1.", "projector_intern/"),
            *_projector_rules("mlp2.", "projector_sam/"),
            *prefixed(LLM_RULES[llm_cfg.family](llm_cfg), "language_model.", "llm/")]


# ---- components ----------------------------------------------------------------------------------------------------

def export_components(model: Leo, out_dir: str | os.PathLike, dtype: str | None = None) -> dict[str, Path]:
    """Each part of a LEO model as its own Hugging Face directory: 'llm' (its family's layout: InternLM2 original
    names, or Llama/Qwen2 for transformers), 'intern_vit' (transformers InternVLVisionModel), 'sam' (transformers
    SamVisionModel). Returns {part: directory}."""
    out = Path(out_dir)
    parts: dict[str, tuple[Any, str]] = {"llm": (model.llm, model.cfg.llm.family),
                                         "intern_vit": (model.intern_vit, "intern_vit"),
                                         "sam": (model.sam, "sam_vision")}
    return {name: export_module(module, family, out / name, dtype) for name, (module, family) in parts.items()}


LEO = register(Family(
    name="leo", model_types=(MODEL_TYPE,), config_cls=LeoConfig, config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, build=Leo, rules=rules, ignored_hf=("rotary_emb.inv_freq",), with_dtype=with_dtype,
    data_fields=data_fields, upstream_problems=upstream_problems,
    export_components=export_components))
