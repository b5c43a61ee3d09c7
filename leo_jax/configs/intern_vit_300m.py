"""InternViT-300M-448px (OpenGVLab/InternViT-300M-448px; LEO's first encoder): 304.0M parameters, 32x32 = 1024
patch tokens + CLS at 448 px. LEO takes the last layer (output_layer=-1), drops CLS and pixel-unshuffles to 256
tokens of width 4096; it fine-tunes with drop-path 0.1 (applied only when the forward gets an rng)."""

from leo_jax.configs import common
from leo_jax.models.vision.intern_vit import InternViTConfig

# OpenGVLab/InternViT-300M-448px config.json (model_type intern_vit_6b); the transformers equivalent is the
# vision_config of OpenGVLab/InternVL3-1B-hf (InternVLVisionConfig with attention_bias=True).
ARCH = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14, image_size=448,
            num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, drop_path_rate=0.1,
            output_layer=-1)


def get_config():
    config = common.get_config()
    config.model = common.model_section("intern_vit", InternViTConfig, attention_impl="auto", **ARCH)
    return config
