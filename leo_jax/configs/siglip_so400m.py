"""SigLIP so400m/14 at 384 px (google/siglip-so400m-patch14-384, vision tower with its pooling head): 428.2M
parameters, 27x27 = 729 tokens of width 1152, no CLS token.

Defaults return HF's `last_hidden_state` (post_layernorm applied). LLaVA-style feature selection reads HF's
`hidden_states[k]`, which has no post-LN: --config.model.output_layer=-2 --config.model.post_norm=False."""

from leo_jax.configs import common
from leo_jax.models.vision.siglip import SiglipVisionConfig

# google/siglip-so400m-patch14-384 config.json, "vision_config"
ARCH = dict(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, patch_size=14, image_size=384,
            num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_tanh", use_head=True)


def get_config():
    config = common.get_config()
    config.model = common.model_section("siglip_vision", SiglipVisionConfig, attention_impl="auto", **ARCH)
    return config
