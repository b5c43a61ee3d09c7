"""CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336, vision tower): 303.5M parameters, 24x24 = 576 patch
tokens + CLS. LEO-MINI's first expert takes the penultimate layer (output_layer=-2) and drops the CLS token;
`get_config("224")` gives the 224 px model (openai/clip-vit-large-patch14, 16x16 patches)."""

from leo_jax.configs import common
from leo_jax.models.vision.clip import CLIPVisionConfig

# openai/clip-vit-large-patch14-336 config.json, "vision_config"
ARCH = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14, image_size=336,
            num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu", output_layer=-2)


def get_config(image_size: str = "336"):
    config = common.get_config()
    config.model = common.model_section("clip_vision", CLIPVisionConfig, attention_impl="auto", **ARCH)
    config.model.image_size = int(image_size)
    return config
