"""Pix2Struct-Large vision encoder (google/pix2struct-large `vision_config`, transformers Pix2StructVisionModel).

LEO-MINI feeds it 576 variable-resolution patches per image (`max_patches`, the static budget the data pipeline
pads to); each patch becomes one token of width 1536. (Eagle instead runs the processor's default 2048 patches,
keeps the first 45 x 45 and bilinearly resizes that grid: set max_patches=2048 for that recipe.) The published
checkpoint is a Pix2StructForConditionalGeneration: `convert import-hf` reads its encoder (family 'pix2struct').
"""

from leo_jax.configs import common
from leo_jax.models.vision.pix2struct import Pix2StructVisionConfig

# google/pix2struct-large config.json -> vision_config
ARCH = dict(hidden_size=1536, patch_embed_hidden_size=768, d_ff=3968, d_kv=64, num_layers=18, num_heads=24,
            hidden_act="gelu_tanh", layer_norm_eps=1e-6, seq_len=4096, max_patches=576)


def get_config():
    config = common.get_config()
    config.model = common.model_section("pix2struct_vision", Pix2StructVisionConfig, attention_impl="auto", **ARCH)
    return config
