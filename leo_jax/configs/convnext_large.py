"""ConvNeXt-Large (facebook/convnext-large-224, transformers ConvNextModel): 196.2M parameters.

LEO-MINI takes the map of stage `output_stage` (default: the last, stride 32, 1536 channels) and resizes it to its
24x24 expert grid (576 tokens); at 768 px input the last stage already is 24x24. Override with
--config.model.output_stage=N (python index) to use an earlier stage.
"""

from leo_jax.configs import common
from leo_jax.models.vision.convnext import ConvNextConfig

# facebook/convnext-large-224 config.json
ARCH = dict(hidden_sizes=(192, 384, 768, 1536), depths=(3, 3, 27, 3), num_channels=3, patch_size=4,
            hidden_act="gelu", layer_scale_init_value=1e-6, layer_norm_eps=1e-12, drop_path_rate=0.0,
            image_size=224, output_stage=-1)


def get_config():
    config = common.get_config()
    config.model = common.model_section("convnext", ConvNextConfig, **ARCH)
    return config
