"""CLIP ViT image encoder (transformers `CLIPVisionModel`): CLS token + patch embedding (no bias) + learned
positions, the `pre_layrnorm`, pre-LN blocks with quick-GELU, and `post_layernorm` for the pooled CLS output.

`__call__` returns HF's `hidden_states[output_layer]`; output_layer=-1 is `last_hidden_state` (no post-LN, as in
HF), -2 the penultimate layer LLaVA and Eagle use. The CLS token is position 0 (LEO-MINI drops it downstream).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from leo_jax.layers.common import POSITION, TOKEN, LayerNorm, normal_init, param
from leo_jax.layers.pixels import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from leo_jax.models.vision.vit import (
    PatchEmbed,
    ViTConfig,
    add_positions,
    block_stack,
    check_image_size,
    layers_to_run,
    prepend_class_token,
    run_blocks,
)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(ViTConfig):
    patch_size: int = 32
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    pixel_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    pixel_std: tuple[float, ...] = OPENAI_CLIP_STD
    # Other input sizes: bicubic-resize the position grid as HF's interpolate_pos_encoding=True; False = HF default
    # (only image_size x image_size is accepted).
    interpolate_pos_encoding: bool = False


class CLIPVisionEncoder(nnx.Module):
    """NHWC pixels [B, H, W, C] -> tokens [B, 1 + (H/p)(W/p), D] (CLS first)."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, kw = cfg.hidden_size, dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.num_channels, d, use_bias=False, rngs=rngs, **kw)
        self.class_embedding = param(rngs, normal_init(0.02), (d,), ("embed",), cfg.param_dtype, role=TOKEN)
        self.position_embedding = param(rngs, normal_init(cfg.position_initializer_range), (cfg.grid ** 2 + 1, d),
                                        ("positions", "embed"), cfg.param_dtype, role=POSITION)
        self.pre_norm = LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, **kw)
        self.layers = block_stack(cfg, rngs)
        self.post_norm = LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, **kw)

    def embed(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        check_image_size(pixels, cfg.image_size, cfg.interpolate_pos_encoding, "CLIPVisionEncoder")
        pos = self.position_embedding[...]
        patches = add_positions(self.patch_embed(pixels), pos[1:], cfg.grid)
        return prepend_class_token(patches, self.class_embedding[...] + pos[0])

    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = self.pre_norm(self.embed(pixels))
        return run_blocks(self.layers, x, layers_to_run(cfg.output_layer, cfg.num_layers, "output_layer"),
                          remat_policy=cfg.remat_policy)

    def pooled(self, last_hidden_state: jax.Array) -> jax.Array:
        """HF's `pooler_output`: post_layernorm of the CLS token of the last layer's states."""
        return self.post_norm(last_hidden_state[:, 0])
