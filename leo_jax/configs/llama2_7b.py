"""Llama-2-7B (and the Vicuna-7B v1.5 architecture)."""

from leo_jax.configs import common
from leo_jax.models.llm.decoder import LLMConfig

ARCH = dict(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
            num_kv_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1,
            eos_token_id=2)


def get_config():
    config = common.get_config()
    config.model = common.model_section("llm", LLMConfig, attention_impl="auto", **ARCH)
    return config
