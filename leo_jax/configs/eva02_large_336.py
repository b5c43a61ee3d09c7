"""EVA-02-L/14 at 336 px (timm `eva02_large_patch14_clip_336`, the EVA02-CLIP-L/14-336 vision tower): 303,645,632
parameters; with timm's 768-wide CLIP projection `head` (1024 x 768 + 768, not part of the tower) 304,432,832,
the 304.4M that timm lists for the model.

24 x 24 = 576 patch tokens of width 1024 after the CLS token; LEO-MINI drops the CLS token downstream.
"""

from leo_jax.configs import common
from leo_jax.models.vision.eva02 import EVA02Config

# timm eva02_large_patch14_clip_336: img_size=336, patch_size=14, embed_dim=1024, depth=24, num_heads=16,
# mlp_ratio=4*2/3 (int(1024 * 2.6667) = 2730), qkv_fused=False, swiglu_mlp, scale_mlp, scale_attn_inner,
# use_rot_pos_emb, ref_feat_shape=(16, 16), global_pool='token'.
ARCH = dict(hidden_size=1024, intermediate_size=2730, num_layers=24, num_heads=16, patch_size=14,
            image_size=(336, 336), layer_norm_eps=1e-6, scale_attn_inner=True, scale_mlp=True, rope_theta=10000.0,
            rope_ref_grid=(16, 16), final_norm=True, qkv_fused=False)


def get_config():
    config = common.get_config()
    config.model = common.model_section("eva02", EVA02Config, attention_impl="auto", **ARCH)
    return config
