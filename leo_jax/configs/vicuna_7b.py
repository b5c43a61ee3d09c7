"""Vicuna-7B v1.5: the Llama-2-7B architecture with pad id 0."""

from leo_jax.configs import llama2_7b


def get_config():
    config = llama2_7b.get_config()
    config.model.pad_token_id = 0
    return config
