"""Llama-3.1-8B: Llama-3-8B with Llama 3 RoPE frequency scaling to 128K context."""

from leo_jax.configs import llama3_8b


def get_config():
    config = llama3_8b.get_config()
    config.model.max_position_embeddings = 131072
    config.model.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return config
