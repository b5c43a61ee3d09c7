"""InternViT (InternViT-300M-448px, LEO's first encoder): CLS token + patch embedding + learned positions, pre-LN
blocks with layer scale (ls1/ls2) and stochastic depth, no final norm.

Two checkpoint layouts hold the same weights (leo_jax/convert/intern_vit.py): transformers `InternVLVisionModel`
and the original OpenGVLab release (fused qkv). Like both references the position grid is always resized
(bicubic) to the input's patch grid, so any size (non-square too) works; at 448 x 448 it is used as is.
`__call__` returns HF's `hidden_states[output_layer]` ([B, 1 + N, D], CLS first); -1 = `last_hidden_state`.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from leo_jax.config import require
from leo_jax.layers.common import POSITION, TOKEN, normal_init, param, zeros_init
from leo_jax.models.vision.vit import (
    PatchEmbed,
    ViTConfig,
    add_positions,
    block_stack,
    layers_to_run,
    prepend_class_token,
    run_blocks,
)


@dataclasses.dataclass(frozen=True)
class InternViTConfig(ViTConfig):
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 448
    qkv_bias: bool = True
    layer_scale_init: float = 0.1  # initial ls1/ls2 value (HF layer_scale_init_value)
    # Stochastic depth for training, rising linearly from 0 at the first layer to this value at the last (timm /
    # InternViT); only applied when `__call__` gets an rng. LEO fine-tunes with 0.1.
    drop_path_rate: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        require(0.0 <= self.drop_path_rate < 1.0,
                f"config.model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


class InternViT(nnx.Module):
    """NHWC pixels [B, H, W, C] -> tokens [B, 1 + (H/p)(W/p), D] (CLS first)."""

    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.num_channels, d, use_bias=True, dtype=cfg.dtype,
                                      param_dtype=cfg.param_dtype, rngs=rngs)
        self.class_embedding = param(rngs, zeros_init, (1, 1, d), (None, None, "embed"), cfg.param_dtype,
                                     role=TOKEN)
        self.position_embedding = param(rngs, normal_init(cfg.position_initializer_range), (1, cfg.grid ** 2 + 1, d),
                                        (None, "positions", "embed"), cfg.param_dtype, role=POSITION)
        self.layers = block_stack(cfg, rngs, qkv_bias=cfg.qkv_bias, layer_scale_init=cfg.layer_scale_init)

    def __call__(self, pixels: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """`rng` turns on drop path (training); without it the forward is deterministic."""
        cfg = self.cfg
        pos = self.position_embedding[...][0]
        patches = add_positions(self.patch_embed(pixels), pos[1:], cfg.grid)
        x = prepend_class_token(patches, self.class_embedding[...][0, 0] + pos[0])
        return run_blocks(self.layers, x, layers_to_run(cfg.output_layer, cfg.num_layers, "output_layer"),
                          remat_policy=cfg.remat_policy, drop_path_rate=cfg.drop_path_rate, rng=rng)
