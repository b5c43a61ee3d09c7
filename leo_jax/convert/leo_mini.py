"""Whole-model conversion of LEO-MINI (family 'leo_mini', config.json model_type 'leo_mini'): the export format of
the PyTorch LEO-MINI in leo_jax.pytorch.leo_mini, and its reverse import.

LEO-MINI has no official checkpoint layout; this one (ours) is the state dict of
`leo_jax.pytorch.leo_mini.LeoMiniForCausalLM`, built from the component tables already in leo_jax.convert:
- `vision_experts.<name>.*`: each expert in its own family's HF naming (transformers CLIPVisionModel,
  SiglipVisionModel, ConvNextModel, Pix2StructVisionModel, SamVisionModel, InternVLVisionModel; timm for EVA-02),
  e.g. `vision_experts.clip.encoder.layers.0.mlp.fc1.weight`.
- `cotr.experts.{i}.query` [N^V, d_i], `cotr.experts.{i}.query_proj.weight`, `cotr.experts.{i}.token_proj.weight`,
  `cotr.text_proj.weight` (leo_jax.pytorch.cotr.CoTR; i in the order of config.model.experts; only for CoTR mode
  'cotr', text_proj only with text_bias).
- `projector.0.*`, `projector.2.*`: Linear -> GELU -> Linear (nn.Sequential indices, LLaVA's mlp2x_gelu).
- `language_model.*`: transformers LlamaForCausalLM (or Qwen2ForCausalLM) naming, `language_model.model.layers.{i}...`,
  `language_model.lm_head.weight`. Each MMoE target projection is a leo_jax.pytorch.mmoe.MMoELinear, so under it:
  `<target>.base.weight` (the frozen W0), `<target>.experts.lora_a` [E, in, r] / `.lora_b` [E, r, out] (routed LoRAs),
  `<target>.general.lora_a` [1, in, r] / `.lora_b` (the always-on LoRA), and, under the first target only (one
  router per layer, as in leo_jax), `<target>.router.{visual_proj, prompt_proj, fc1, fc2}.{weight, bias}`;
  e.g. `language_model.model.layers.0.mlp.down_proj.router.fc1.weight`.

config.json holds `leo_jax` (the complete leo_jax LeoMiniConfig: import rebuilds the identical model) and what the
PyTorch model builds its modules from: `vision_experts` (name, kind, the expert's HF config, its output layer/stage,
grid, token count and width), `cotr`, `projector`, `text_config` (the LLM's HF config), `mmoe`, `image_context_id`,
`conditioning` (which user turns condition CoTR and the routers on multi-turn rows).

`export_components` writes the parts as standalone HF directories: the LLM's base weights (without the LoRA experts
and routers) and one directory per vision expert.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from leo_jax.convert.core import ConversionError, Family, Rule, copy, get_family, linear, prefixed, register
from leo_jax.convert.llm import llama_rules
from leo_jax.convert.vit import linear_with_bias
from leo_jax.models.leo_mini import LeoMini, LeoMiniConfig, VisionExpertConfig
from leo_jax.models.mmoe import MMoEConfig
from leo_jax.models.projector import torch_projector_names

LLM_FAMILIES = ("llama", "qwen2")  # LLM families transformers has (InternLM2 is not in transformers)
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# encoder config fields that decide which output the PyTorch expert reads (copied into config.json's vision_experts)
TOKEN_FIELDS = ("output_layer", "output_stage", "interpolate_pos_encoding", "post_norm")


def _expert_encoder_config(spec: VisionExpertConfig) -> Any:
    """The expert's encoder config in the layout of the transformers model class (ConvNextModel names, not the
    classifier checkpoint's `convnext.` prefix)."""
    cfg = spec.encoder
    return dataclasses.replace(cfg, checkpoint_prefix="") if spec.kind == "convnext" else cfg


def _target_module(target: str) -> str:
    """HF module path of an MMoE target inside a decoder layer."""
    return f"{'self_attn' if target in ATTENTION_TARGETS else 'mlp'}.{target}"


def _check_llm(cfg: LeoMiniConfig) -> None:
    family = cfg.llm.family
    if family not in LLM_FAMILIES:
        raise ConversionError(f"config.model.llm.family={family!r}: a LEO-MINI export writes its LLM in transformers "
                              f"naming, available for {LLM_FAMILIES}")
    if cfg.llm.mmoe is None:
        raise ConversionError("config.model.llm.mmoe is missing: LEO-MINI's LLM carries MMoE LoRA experts")


def config_to_hf(cfg: LeoMiniConfig, original: dict) -> dict:
    _check_llm(cfg)
    llm = cfg.llm
    text = get_family(llm.family).config_to_hf(dataclasses.replace(llm, mmoe=None), original.get("text_config", {}))
    original_experts = {e.get("name"): e for e in original.get("vision_experts", [])}
    experts = []
    for spec, (tokens, width) in zip(cfg.experts, cfg.expert_shapes):
        encoder = _expert_encoder_config(spec)
        entry = dict(name=spec.name, kind=spec.kind, grid=spec.grid, tokens=tokens, width=width,
                     config=get_family(spec.kind).config_to_hf(
                         encoder, original_experts.get(spec.name, {}).get("config", {})))
        entry.update({f: getattr(encoder, f) for f in TOKEN_FIELDS if hasattr(encoder, f)})
        experts.append(entry)
    cotr, projector = cfg.cotr_config, cfg.projector_config
    hf = dict(original)
    hf.update(
        model_type="leo_mini", architectures=["LeoMiniForCausalLM"], leo_jax=dataclasses.asdict(cfg),
        vision_experts=experts, text_config=text, mmoe=dataclasses.asdict(llm.mmoe),
        cotr=dict(expert_widths=list(cotr.expert_widths), expert_tokens=list(cotr.expert_tokens),
                  text_width=cotr.text_width, num_queries=cotr.num_queries, proj_width=cotr.proj_width,
                  pooling=cotr.pooling, scale=cotr.scale, visual_bias=cotr.visual_bias,
                  spatial_prior=cotr.spatial_prior, text_bias=cotr.text_bias, mode=cotr.mode),
        projector=dict(in_features=projector.in_features, out_features=projector.out_features, act=projector.act,
                       layer_norm=projector.layer_norm),
        image_context_id=cfg.image_context_id, conditioning=cfg.conditioning)
    return hf


def config_from_hf(hf: dict) -> LeoMiniConfig:
    if not isinstance(hf.get("leo_jax"), dict):
        raise ConversionError("config.json (model_type 'leo_mini') has no 'leo_jax' object (the leo_jax LEO-MINI "
                              "config): only directories written by leo_jax's LEO-MINI export can be imported")
    return LeoMiniConfig.from_config(hf["leo_jax"], "config.json:leo_jax")


def with_dtype(cfg: LeoMiniConfig, dtype: str | None, param_dtype: str | None) -> LeoMiniConfig:
    """Compute / storage dtypes of every component (experts, CoTR, projector, LLM); None keeps each part's own."""
    changes = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    experts = tuple(dataclasses.replace(e, encoder=dataclasses.replace(e.encoder, **changes)) for e in cfg.experts)
    return dataclasses.replace(cfg, experts=experts, **{part: dataclasses.replace(getattr(cfg, part), **changes)
                                                       for part in ("llm", "cotr", "projector")})


def _lora(hf: str, jax_path: str, layers, factor: str) -> Rule:
    """torch LoRAExperts A [E, in, r] / B [E, r, out] <-> leo_jax lora_a [E, *in, r] / lora_b [E, r, *out]."""
    def to_hf(arrays):
        a = arrays[0]
        return [a.reshape(a.shape[0], -1, a.shape[-1]) if factor == "a" else a.reshape(a.shape[0], a.shape[1], -1)]

    return Rule((hf,), (jax_path,), lambda a, shapes: [a[0].reshape(shapes[0])], to_hf, layers)


def _llm_rules(cfg: LeoMiniConfig) -> list[Rule]:
    llm = cfg.llm
    mmoe: MMoEConfig = llm.mmoe
    wrapped = [f".{_target_module(t)}." for t in mmoe.targets]

    def base_name(name: str) -> str:  # a target's own weight/bias is MMoELinear's `base`
        return next((name.replace(w, f"{w}base.") for w in wrapped if w in name), name)

    out = [dataclasses.replace(r, hf=tuple(base_name(n) for n in r.hf))
           for r in prefixed(llama_rules(llm), "language_model.", "llm/")]
    L, p, j = tuple(range(llm.num_layers)), "language_model.model.layers.{i}.", "llm/layers/mmoe/"
    router = f"{p}{_target_module(mmoe.targets[0])}.router."
    for sub in ("visual_proj", "prompt_proj", "fc1", "fc2"):
        out += linear_with_bias(router + sub, f"{j}router/{sub}", L)
    for target in mmoe.targets:
        kinds = ("experts", "general") if mmoe.general_rank else ("experts",)
        for kind in kinds:
            hf = f"{p}{_target_module(target)}.{kind}."
            out += [_lora(hf + "lora_a", f"{j}{kind}/{target}/lora_a", L, "a"),
                    _lora(hf + "lora_b", f"{j}{kind}/{target}/lora_b", L, "b")]
    return out


def rules(cfg: LeoMiniConfig) -> list[Rule]:
    _check_llm(cfg)
    out = []
    for spec in cfg.experts:
        out += prefixed(get_family(spec.kind).rules(_expert_encoder_config(spec)), f"vision_experts.{spec.name}.",
                        f"experts/{spec.name}/")
    cotr = cfg.cotr_config
    for i in range(len(cfg.experts) if cotr.learned else 0):  # the fixed reductions have no weights
        hf, jx = f"cotr.experts.{i}.", f"cotr/experts/{i}/"
        out += [copy(hf + "query", jx + "query"), linear(hf + "query_proj.weight", jx + "query_proj/kernel"),
                linear(hf + "token_proj.weight", jx + "token_proj/kernel")]
    if cotr.learned and cotr.text_bias:
        out.append(linear("cotr.text_proj.weight", "cotr/text_proj/kernel"))
    for path, index in torch_projector_names(layer_norm=False).items():
        out += linear_with_bias(f"projector.{index}", "projector/" + path.replace(".", "/"), None)
    return out + _llm_rules(cfg)


LLM_NOTE = ("the base LLM of a LEO-MINI model: the MMoE LoRA experts and routers are not included (they are in the "
            "whole-model 'leo_mini' export); this LLM alone is LEO-MINI with every LoRA delta left out")


def export_components(model: LeoMini, out_dir: str | Path, dtype: str | None = None) -> dict[str, Path]:
    """Writes each component as a standalone Hugging Face directory: `llm/` (the base LLM, transformers Llama/Qwen2
    naming) and `vision_experts/<name>/` (each expert in its family's format; EVA-02 in timm's, loadable by
    leo_jax.pytorch.eva02). Returns {directory relative to out_dir: its path}."""
    from leo_jax.convert.api import export_module

    _check_llm(model.cfg)
    out = Path(out_dir)
    llm_family = model.cfg.llm.family
    paths = {"llm": export_module(model.llm, llm_family, out / "llm", dtype=dtype,
                                  hf_config={"leo_mini_note": LLM_NOTE})}
    for spec in model.specs:
        relative = f"vision_experts/{spec.name}"
        paths[relative] = export_module(model.experts[spec.name], spec.kind, out / relative, dtype=dtype)
    return paths


LEO_MINI = register(Family(
    name="leo_mini", model_types=("leo_mini",), config_cls=LeoMiniConfig, config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, build=LeoMini, rules=rules, with_dtype=with_dtype,
    export_components=export_components))
