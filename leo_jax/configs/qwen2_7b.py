"""Qwen2-7B(-Instruct): q/k/v biases, GQA with 4 KV heads, theta 1e6."""

from leo_jax.configs import common
from leo_jax.models.llm.decoder import LLMConfig

ARCH = dict(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
            num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
            qkv_bias=True, bos_token_id=151643, eos_token_id=151645)


def get_config():
    config = common.get_config()
    config.model = common.model_section("llm", LLMConfig, attention_impl="auto", **ARCH)
    return config
