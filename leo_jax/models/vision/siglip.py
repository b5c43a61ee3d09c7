"""SigLIP image encoder (transformers `SiglipVisionModel`): patch embedding with bias + learned positions (no CLS
token), pre-LN blocks with tanh-GELU, `post_layernorm`, and an optional attention-pooling head.

What `__call__` returns, exactly as HF: with the defaults (output_layer=-1, post_norm=True) HF's
`last_hidden_state`, which INCLUDES post_layernorm. HF's `hidden_states[k]` (what LLaVA-style models read, e.g.
k=-2 or k=-1) never includes it: set output_layer=k and post_norm=False.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from leo_jax.layers.attention import dot_product_attention
from leo_jax.layers.common import POSITION, TOKEN, LayerNorm, Linear, normal_init, param
from leo_jax.layers.mlp import MLP
from leo_jax.layers.pixels import HALF_MEAN, HALF_STD
from leo_jax.models.vision.vit import (
    TOKEN_AXES,
    PatchEmbed,
    ViTConfig,
    add_positions,
    block_stack,
    check_image_size,
    layers_to_run,
    run_blocks,
)
from leo_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(ViTConfig):
    hidden_act: str = "gelu_tanh"
    pixel_mean: tuple[float, ...] = HALF_MEAN
    pixel_std: tuple[float, ...] = HALF_STD
    interpolate_pos_encoding: bool = False  # as CLIPVisionConfig: bicubic position resize for other input sizes
    post_norm: bool = True  # apply post_layernorm to the output (HF last_hidden_state); False for hidden_states[k]
    use_head: bool = True  # HF vision_use_head: the attention-pooling head (only `pooled` uses it)


class AttentionPoolingHead(nnx.Module):
    """HF's SiglipMultiheadAttentionPoolingHead: a learned probe attends over the tokens (torch MultiheadAttention),
    then a residual LayerNorm + MLP; one pooled vector per image."""

    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.num_heads
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.probe = param(rngs, normal_init(1.0), (1, 1, d), (None, None, "embed"), cfg.param_dtype,
                           role=TOKEN)
        heads = dict(in_axes=("embed",), out_axes=("heads", "head_dim"), use_bias=True, **kw)
        self.q_proj, self.k_proj, self.v_proj = (Linear(d, (h, d // h), **heads) for _ in range(3))
        self.o_proj = Linear((h, d // h), d, in_axes=("heads", "head_dim"), out_axes=("embed",), use_bias=True, **kw)
        self.norm = LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
        self.mlp = MLP(d, cfg.intermediate_size, act=cfg.hidden_act, **kw)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        probe = jnp.broadcast_to(self.probe[...], (tokens.shape[0], 1, tokens.shape[-1]))
        x = self.o_proj(dot_product_attention(self.q_proj(probe), self.k_proj(tokens), self.v_proj(tokens)))
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


class SiglipVisionEncoder(nnx.Module):
    """NHWC pixels [B, H, W, C] -> tokens [B, (H/p)(W/p), D]."""

    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, kw = cfg.hidden_size, dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.num_channels, d, use_bias=True, rngs=rngs, **kw)
        self.position_embedding = param(rngs, normal_init(cfg.position_initializer_range), (cfg.grid ** 2, d),
                                        ("positions", "embed"), cfg.param_dtype, role=POSITION)
        self.layers = block_stack(cfg, rngs)
        self.post_norm = LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, **kw)
        self.head = AttentionPoolingHead(cfg, rngs=rngs) if cfg.use_head else None

    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        check_image_size(pixels, cfg.image_size, cfg.interpolate_pos_encoding, "SiglipVisionEncoder")
        x = constrain(add_positions(self.patch_embed(pixels), self.position_embedding[...], cfg.grid), TOKEN_AXES)
        x = run_blocks(self.layers, x, layers_to_run(cfg.output_layer, cfg.num_layers, "output_layer"),
                       remat_policy=cfg.remat_policy)
        return self.post_norm(x) if cfg.post_norm else x

    def pooled(self, last_hidden_state: jax.Array) -> jax.Array:
        """HF's `pooler_output` from `last_hidden_state` (post-LN applied): the attention-pooling head."""
        if self.head is None:
            raise ValueError("this SigLIP encoder has no pooling head (config.model.use_head=False)")
        return self.head(last_hidden_state)
