"""Conversion tables for the LLM family: Llama (2, 3, Vicuna), Qwen2 and InternLM2 (original layout)."""

from __future__ import annotations

import numpy as np

from leo_jax.convert.core import ConversionError, Family, Rule, copy, linear, register, transformers_config_writer
from leo_jax.models.llm.decoder import CausalLM, LLMConfig

# HF config fields that the leo_jax config does not model but that must keep their defaults.
_UNSUPPORTED = {"mlp_bias": False, "pretraining_tp": 1, "use_sliding_window": False}
_ACT = "silu"


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers 5 `rope_parameters` or the older rope_theta + rope_scaling."""
    params = hf.get("rope_parameters")
    if params:
        params = dict(params)
        theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        return theta, (None if kind == "default" else params)
    scaling = hf.get("rope_scaling")
    return float(hf.get("rope_theta", 10000.0)), (dict(scaling) if scaling else None)


def _require_fields(hf: dict, names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in hf]
    if missing:
        raise ConversionError(f"config.json lacks field(s) {missing} needed to build the model")


def _llm_config_from_hf(hf: dict, family: str) -> LLMConfig:
    _require_fields(hf, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads"))
    for key, default in _UNSUPPORTED.items():
        if hf.get(key, default) != default:
            raise ConversionError(f"config.json: {key}={hf[key]!r} is not supported by leo_jax (expected {default!r})")
    if hf.get("hidden_act", _ACT) != _ACT:
        raise ConversionError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    theta, scaling = _rope_from_hf(hf)
    heads = hf["num_attention_heads"]
    if family == "internlm2":
        qkv_bias = out_bias = bool(hf.get("bias", False))
    elif family == "qwen2":
        qkv_bias, out_bias = True, False
    else:
        qkv_bias = out_bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    return LLMConfig(
        family=family,
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        rope_scaling=scaling, max_position_embeddings=hf.get("max_position_embeddings", 4096),
        qkv_bias=qkv_bias, out_bias=out_bias, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos, pad_token_id=hf.get("pad_token_id"),
        dtype="float32", param_dtype="float32")


def _llm_config_to_hf(cfg: LLMConfig, original: dict) -> dict:
    """HF config dict: the original file's fields, with the architecture fields taken from `cfg`."""
    hf = dict(original)
    rope = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    hf.update(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, hidden_act=_ACT, rms_norm_eps=cfg.rms_norm_eps,
              max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_embeddings,
              initializer_range=cfg.initializer_range, bos_token_id=cfg.bos_token_id, eos_token_id=eos,
              pad_token_id=cfg.pad_token_id)
    if cfg.family == "internlm2":
        hf.pop("rope_parameters", None)
        hf.update(model_type="internlm2", architectures=["InternLM2ForCausalLM"], bias=cfg.qkv_bias,
                  rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling)
        hf.setdefault("auto_map", {"AutoConfig": "configuration_internlm2.InternLM2Config",
                                   "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"})
    else:
        hf.pop("rope_scaling", None)
        hf.pop("rope_theta", None)
        hf.update(model_type=cfg.family, rope_parameters=rope, head_dim=cfg.resolved_head_dim)
        hf.setdefault("architectures", ["LlamaForCausalLM" if cfg.family == "llama" else "Qwen2ForCausalLM"])
        if cfg.family == "llama":
            hf["attention_bias"] = cfg.qkv_bias
    return hf


def _common_rules(cfg: LLMConfig, names: dict[str, str]) -> list[Rule]:
    L = tuple(range(cfg.num_layers))
    p = "model.layers.{i}."
    rules = [
        copy(names["embed"], "embed/embedding"),
        copy(p + names["attn_norm"], "layers/input_norm/scale", L),
        copy(p + names["mlp_norm"], "layers/post_attn_norm/scale", L),
        linear(p + names["o"], "layers/attn/o_proj/kernel", n_in=2, layers=L),
        linear(p + names["gate"], "layers/mlp/gate_proj/kernel", layers=L),
        linear(p + names["up"], "layers/mlp/up_proj/kernel", layers=L),
        linear(p + names["down"], "layers/mlp/down_proj/kernel", layers=L),
        copy("model.norm.weight", "norm/scale"),
    ]
    if cfg.out_bias:
        rules.append(copy(p + names["o"].replace(".weight", ".bias"), "layers/attn/o_proj/bias", L))
    if not cfg.tie_embeddings:
        rules.append(linear(names["lm_head"], "lm_head/kernel"))
    return rules


def llama_rules(cfg: LLMConfig) -> list[Rule]:
    """transformers LlamaForCausalLM / Qwen2ForCausalLM names (identical layout; Qwen2 adds q/k/v biases)."""
    L = tuple(range(cfg.num_layers))
    p = "model.layers.{i}.self_attn."
    rules = _common_rules(cfg, dict(embed="model.embed_tokens.weight", attn_norm="input_layernorm.weight",
                                    mlp_norm="post_attention_layernorm.weight", o="self_attn.o_proj.weight",
                                    gate="mlp.gate_proj.weight", up="mlp.up_proj.weight", down="mlp.down_proj.weight",
                                    lm_head="lm_head.weight"))
    for proj in ("q_proj", "k_proj", "v_proj"):
        rules.append(linear(p + proj + ".weight", f"layers/attn/{proj}/kernel", layers=L))
        if cfg.qkv_bias:
            rules.append(copy(p + proj + ".bias", f"layers/attn/{proj}/bias", L, flatten=True))
    return rules


def _split_wqkv(cfg: LLMConfig):
    """InternLM2's fused wqkv [(K*(G+2))*D, E], grouped per KV head as [G queries, 1 key, 1 value], <-> q/k/v
    kernels [E, H, D], [E, K, D], [E, K, D]. Works for weights ([..., E]) and biases ([...])."""
    k_heads, d = cfg.num_kv_heads, cfg.resolved_head_dim
    g = cfg.num_heads // k_heads

    def to_jax(arrays, shapes):
        w = arrays[0]
        trailing = w.shape[1:]
        grouped = w.reshape(k_heads, g + 2, d, *trailing)
        q = grouped[:, :g].reshape(k_heads * g, d, *trailing)
        k, v = grouped[:, g], grouped[:, g + 1]
        parts = (q, k, v)
        if trailing:  # weights: move E to the front -> [E, heads, D]
            parts = tuple(np.moveaxis(x, -1, 0) for x in parts)
        return [x.reshape(s) for x, s in zip(parts, shapes)]

    def to_hf(arrays):
        q, k, v = arrays
        is_weight = q.ndim == 3
        if is_weight:  # [E, heads, D] -> [heads, D, E]
            q, k, v = (np.moveaxis(x, 0, -1) for x in (q, k, v))
        trailing = q.shape[2:]
        grouped = np.concatenate([q.reshape(k_heads, g, d, *trailing), k[:, None], v[:, None]], axis=1)
        return [grouped.reshape(k_heads * (g + 2) * d, *trailing)]

    return to_jax, to_hf


def internlm2_rules(cfg: LLMConfig) -> list[Rule]:
    """InternLM2's original checkpoint names (modeling_internlm2.py)."""
    L = tuple(range(cfg.num_layers))
    p = "model.layers.{i}.attention."
    rules = _common_rules(cfg, dict(embed="model.tok_embeddings.weight", attn_norm="attention_norm.weight",
                                    mlp_norm="ffn_norm.weight", o="attention.wo.weight",
                                    gate="feed_forward.w1.weight", up="feed_forward.w3.weight",
                                    down="feed_forward.w2.weight", lm_head="output.weight"))
    qkv = tuple(f"layers/attn/{n}_proj/kernel" for n in "qkv")
    rules.append(Rule((p + "wqkv.weight",), qkv, *_split_wqkv(cfg), layers=L))
    if cfg.qkv_bias:
        rules.append(Rule((p + "wqkv.bias",), tuple(x.replace("kernel", "bias") for x in qkv), *_split_wqkv(cfg),
                          layers=L))
    return rules


def _family(name: str, model_types: tuple[str, ...], rules, **kwargs) -> Family:
    return register(Family(
        name=name, model_types=model_types, config_cls=LLMConfig,
        config_from_hf=lambda hf: _llm_config_from_hf(hf, name),
        config_to_hf=_llm_config_to_hf, build=CausalLM, rules=rules, ignored_hf=("rotary_emb.inv_freq",), **kwargs))


LLAMA = _family("llama", ("llama",), llama_rules, write_config=transformers_config_writer("LlamaConfig"))
QWEN2 = _family("qwen2", ("qwen2",), llama_rules, write_config=transformers_config_writer("Qwen2Config"))
INTERNLM2 = _family("internlm2", ("internlm2",), internlm2_rules)  # not in transformers: plain config.json

