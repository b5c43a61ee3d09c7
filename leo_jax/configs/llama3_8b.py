"""Llama-3-8B(-Instruct): GQA with 8 KV heads, 128K vocabulary, theta 500000 (8.03B parameters)."""

from leo_jax.configs import common
from leo_jax.models.llm.decoder import LLMConfig

ARCH = dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
            num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
            bos_token_id=128000, eos_token_id=(128001, 128009))


def get_config():
    config = common.get_config()
    config.model = common.model_section("llm", LLMConfig, attention_impl="auto", **ARCH)
    return config
