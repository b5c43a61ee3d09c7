"""Tiny random Hugging Face models saved to disk, shared by the LLM tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LLAMA2 = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
LLAMA3 = dict(LLAMA2, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16})
LLAMA_GQA_BIAS = dict(LLAMA2, num_key_value_heads=2, attention_bias=True)  # the reference for InternLM2 with bias
QWEN2 = dict(LLAMA2, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def save_hf_model(kind: str, kwargs: dict, out: Path, seed: int = 0, dtype=torch.float32):
    """Builds a random transformers model and writes it with save_pretrained; returns the torch model (fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind, **kwargs)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # make norms and biases non-trivial so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(out)
    return model.float()


def internlm2_from_llama(llama_model, out: Path, bias: bool = False):
    """Writes an InternLM2-layout checkpoint (fused wqkv grouped per KV head, w1/w2/w3, ...) holding the same
    weights as a LlamaForCausalLM, so the Llama model is the PyTorch reference for it."""
    from safetensors.torch import save_file

    cfg = llama_model.config
    heads, kv, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    d, g = hidden // heads, heads // kv
    sd = llama_model.state_dict()
    out_sd = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
              "model.norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        qw = sd[q + "q_proj.weight"].reshape(kv, g, d, hidden)
        kw = sd[q + "k_proj.weight"].reshape(kv, 1, d, hidden)
        vw = sd[q + "v_proj.weight"].reshape(kv, 1, d, hidden)
        out_sd[p + "attention.wqkv.weight"] = torch.cat([qw, kw, vw], 1).reshape(-1, hidden).contiguous()
        out_sd[p + "attention.wo.weight"] = sd[q + "o_proj.weight"]
        if bias:
            qb = sd[q + "q_proj.bias"].reshape(kv, g, d)
            kb, vb = sd[q + "k_proj.bias"].reshape(kv, 1, d), sd[q + "v_proj.bias"].reshape(kv, 1, d)
            out_sd[p + "attention.wqkv.bias"] = torch.cat([qb, kb, vb], 1).reshape(-1).contiguous()
            out_sd[p + "attention.wo.bias"] = sd[q + "o_proj.bias"]
        out_sd[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out_sd[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out_sd[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out_sd[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out_sd[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out_sd.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
              "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                           "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
              "vocab_size": cfg.vocab_size, "hidden_size": hidden, "intermediate_size": cfg.intermediate_size,
              "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": heads, "num_key_value_heads": kv,
              "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
              "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_parameters["rope_theta"],
              "rope_scaling": None, "bias": bias, "tie_word_embeddings": False, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.02, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
