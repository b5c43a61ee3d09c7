"""InternLM2-chat-7B (the LLM of LEO): GQA 8 KV heads, theta 1e6, dynamic NTK scaling (7.74B parameters)."""

from leo_jax.configs import common
from leo_jax.models.llm.decoder import LLMConfig

ARCH = dict(family="internlm2", vocab_size=92544, hidden_size=4096, intermediate_size=14336, num_layers=32,
            num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768,
            rope_scaling={"type": "dynamic", "factor": 2.0}, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def get_config():
    config = common.get_config()
    config.model = common.model_section("llm", LLMConfig, attention_impl="auto", **ARCH)
    return config
