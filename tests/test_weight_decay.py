"""Weight decay is decided by each parameter's role: every bias and norm scale is exempt, whatever its rank (q/k/v
biases shaped [heads, head_dim] included), and the exempt set equals the Hugging Face Trainer's on the same model."""

from __future__ import annotations

import math

import pytest
import torch
from flax import nnx
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    InternVLVisionConfig,
    InternVLVisionModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    Trainer,
)

from leo_jax.config import load_config
from leo_jax.models import registry
from leo_jax.train.config import TrainConfig
from leo_jax.train.optimizer import decay_summary, decays

VIT_BLOCK = ["layers/attn/k_proj/bias", "layers/attn/o_proj/bias", "layers/attn/q_proj/bias", "layers/attn/v_proj/bias",
             "layers/mlp/fc1/bias", "layers/mlp/fc2/bias", "layers/norm1/bias", "layers/norm1/scale",
             "layers/norm2/bias", "layers/norm2/scale"]
# Every parameter that must not decay, per family (full-size presets).
NOT_DECAYED = {
    "qwen2_7b": ["layers/attn/k_proj/bias", "layers/attn/q_proj/bias", "layers/attn/v_proj/bias",
                 "layers/input_norm/scale", "layers/post_attn_norm/scale", "norm/scale"],
    "clip_vit_l14_336": VIT_BLOCK + ["post_norm/bias", "post_norm/scale", "pre_norm/bias", "pre_norm/scale"],
    "siglip_so400m": VIT_BLOCK + ["head/k_proj/bias", "head/mlp/fc1/bias", "head/mlp/fc2/bias", "head/norm/bias",
                                  "head/norm/scale", "head/o_proj/bias", "head/q_proj/bias", "head/v_proj/bias",
                                  "patch_embed/bias", "post_norm/bias", "post_norm/scale"],
    "intern_vit_300m": VIT_BLOCK + ["patch_embed/bias"],
}
# The same models in transformers (configs of Qwen/Qwen2-7B, openai/clip-vit-large-patch14-336,
# google/siglip-so400m-patch14-384, OpenGVLab/InternViT-300M-448px), built on the meta device.
HF_MODELS = {
    "qwen2_7b": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, tie_word_embeddings=False)),
    "clip_vit_l14_336": lambda: CLIPVisionModel(CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
        image_size=336)),
    "siglip_so400m": lambda: SiglipVisionModel(SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14,
        image_size=384)),
    "intern_vit_300m": lambda: InternVLVisionModel(InternVLVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=[448, 448],
        patch_size=[14, 14], attention_bias=True, use_qk_norm=False, use_mean_pooling=True, norm_type="layer_norm")),
}


def _flat_params(preset: str) -> dict:
    state = nnx.state(registry.abstract_model(load_config(preset).model), nnx.Param)
    return {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("preset", sorted(NOT_DECAYED))
def test_every_bias_and_norm_is_exempt_and_matches_the_hf_trainer(preset):
    flat = _flat_params(preset)
    exempt = sorted(name for name, v in flat.items() if not decays(v))
    assert exempt == sorted(NOT_DECAYED[preset])
    assert all(decays(v) for name, v in flat.items() if name.endswith(("kernel", "embedding")))
    ours = sum(math.prod(v.get_value().shape) for name, v in flat.items() if not decays(v))
    with torch.device("meta"):
        model = HF_MODELS[preset]()
    decayed_names = set(Trainer.get_decay_parameter_names(None, model))
    theirs = sum(p.numel() for name, p in model.named_parameters() if name not in decayed_names)
    total = sum(p.numel() for p in model.parameters())
    print(f"{preset}: not decayed {ours:,} (HF Trainer {theirs:,}) of {total:,}")
    assert ours == theirs > 0
    assert sum(math.prod(v.get_value().shape) for v in flat.values()) == total


def test_roles_not_rank_decide():
    """A [heads, head_dim] bias has two dims yet is exempt; a 1-d CLS token and the LoRA factors decay; configured
    roles are exempt on request, unknown ones are a clear error."""
    flat = _flat_params("qwen2_7b")
    assert flat["layers/attn/q_proj/bias"].get_value().ndim == 3  # [layers, heads, head_dim]
    assert not decays(flat["layers/attn/q_proj/bias"])
    clip = _flat_params("clip_vit_l14_336")
    assert clip["class_embedding"].get_value().ndim == 1 and decays(clip["class_embedding"])
    assert not decays(clip["position_embedding"], ("bias", "norm", "position"))
    mini = _flat_params("tiny_leo_mini")
    lora = [v for name, v in mini.items() if "lora_" in name]
    assert lora and all(decays(v) for v in lora)
    assert decays(mini["cotr/experts/0/query"]) and decays(mini["cotr/experts/1/query"])
    summary = decay_summary(nnx.State({"bias": mini["experts/clip/layers/attn/q_proj/bias"],
                                       "query": mini["cotr/experts/0/query"]}))
    assert summary == "decayed 1,024 (query 1,024); not decayed 128 (bias 128)", summary
    with pytest.raises(ValueError, match="no_decay_roles: unknown role"):
        TrainConfig(steps=1, learning_rate=1.0, no_decay_roles=("biases",))
