"""Tiny CPU versions of the LLM presets: `tiny_llm` (Llama 2 style) or `tiny_llm:<preset>` for any LLM preset, e.g.
`--config tiny_llm:llama3_1_8b` keeps that family's layout, biases and RoPE scaling at toy size."""

import importlib

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, dtype="float32",
            max_position_embeddings=512)


def get_config(preset: str = "llama2_7b"):
    config = importlib.import_module(f"leo_jax.configs.{preset}").get_config()
    kv_ratio = config.model.num_heads // config.model.num_kv_heads
    eos = (2,) if isinstance(config.model.eos_token_id, tuple) else 2  # ids inside the tiny vocabulary
    config.model.update(TINY, num_kv_heads=max(1, TINY["num_heads"] // kv_ratio), bos_token_id=1, eos_token_id=eos)
    if config.model.rope_scaling and "original_max_position_embeddings" in config.model.rope_scaling:
        config.model.rope_scaling = {**config.model.rope_scaling, "original_max_position_embeddings": 32}
    return config
