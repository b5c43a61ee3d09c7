"""SAM ViT-L image encoder (facebook/sam-vit-large, vision tower; LEO's second encoder): 308.3M parameters.
1024 px input (longest side resized to 1024, then padded) -> neck map [64, 64, 256]; LEO pixel-unshuffles it by 4
to 16x16 = 256 tokens of width 4096."""

from leo_jax.configs import common
from leo_jax.models.vision.sam import SamVisionConfig

# facebook/sam-vit-large config.json, "vision_config"
ARCH = dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096, patch_size=16, image_size=1024,
            num_channels=3, output_channels=256, window_size=14, global_attn_indexes=(5, 11, 17, 23),
            layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, use_abs_pos=True, use_rel_pos=True)


def get_config():
    config = common.get_config()
    # The relative-position bias keeps SAM's attention on xla (no kernel takes it), so the 4 global layers attend 16 of
    # the 64 grid rows of queries at a time: 256 MiB of fp32 logits per image instead of 1 GiB, the same result.
    # Measured: leo_8b_sft on v5p-128 (AOT) 45.5 -> 19.6 GiB of temporaries per chip (README "Measured").
    config.model = common.model_section("sam_vision", SamVisionConfig, attention_impl="auto",
                                        global_query_chunk_rows=16, **ARCH)
    return config
