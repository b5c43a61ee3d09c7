"""EVA-02 ViT (timm `Eva` with the EVA-02 settings, e.g. `eva02_large_patch14_clip_336`).

Pre-LN blocks whose attention applies a 2-D rotary embedding to the patch tokens (not the CLS token), has q/v
biases but no k bias and, in the CLIP variants, a LayerNorm on the attention output before the projection
("sub-LN", timm `scale_attn_inner`); the MLP is SwiGLU with a LayerNorm on its hidden activations (timm `SwiGLU`
with `norm_layer`, `scale_mlp`). A CLS token and absolute position embeddings are added before the blocks.

The rotary table follows timm's `RotaryEmbeddingCat(in_pixels=False, ref_feat_shape=...)`: for patch (y, x) of a
gh x gw grid the coordinates are y * ref_h / gh and x * ref_w / gw, frequencies theta^(-k / (head_dim / 4)) for
k < head_dim / 4; the first half of each head is rotated by the row angle, the second by the column angle, each
frequency used by an adjacent (interleaved) pair of channels.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from leo_jax.config import dataclass_from_config, require
from leo_jax.layers.attention import attend, check_attention_impl
from leo_jax.layers.common import POSITION, TOKEN, LayerNorm, Linear, check_numerics, normal_init, param, stack_layers
from leo_jax.layers.pixels import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, check_mean_std
from leo_jax.models.vision.vit import TOKEN_AXES, PatchEmbed, drop_path, layers_to_run, run_blocks
from leo_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class EVA02Config:
    """Architecture (timm Eva arguments in leo_jax names) and numerics; defaults: EVA-02-L/14 at 336 px."""

    hidden_size: int = 1024  # timm embed_dim
    intermediate_size: int = 2730  # SwiGLU width: int(embed_dim * mlp_ratio), mlp_ratio = 4 * 2 / 3
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    image_size: tuple[int, int] = (336, 336)  # (height, width) the position embeddings were trained for
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    scale_attn_inner: bool = True  # LayerNorm on the attention output before `proj` (EVA-02 CLIP towers)
    scale_mlp: bool = True  # LayerNorm inside the SwiGLU MLP (EVA-02 B/L; Ti/S have none and a packed fc1)
    rope_theta: float = 10000.0
    rope_ref_grid: tuple[int, int] | None = (16, 16)  # the pre-training grid RoPE coordinates are scaled to
    final_norm: bool = True  # timm global_pool='token' models end with `norm`; 'avg' ones do not
    qkv_fused: bool = False  # checkpoint layout only: fused `qkv` + q_bias/v_bias instead of q/k/v_proj
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly over the blocks (training only)
    output_layer: int = -1  # -1: the final (normed) tokens; else timm's block outputs, 0 = embeddings, -2 = penult.
    # RGB normalisation of the published checkpoint's inputs, (pixel / 255 - mean) / std, applied on device
    pixel_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    pixel_std: tuple[float, ...] = OPENAI_CLIP_STD
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    # Attention kernel (leo_jax.layers.attention): xla | splash | cudnn | auto; splash_block: splash's block size.
    attention_impl: str = "auto"
    splash_block: int = 512

    def __post_init__(self):
        w = "config.model"
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size", "num_channels"):
            require(getattr(self, name) > 0, f"{w}.{name} must be positive, got {getattr(self, name)}")
        require(self.hidden_size % self.num_heads == 0,
                f"{w}.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        require(self.head_dim % 4 == 0, f"{w}: head_dim={self.head_dim} must be a multiple of 4 for the 2-D RoPE")
        require(all(s > 0 and s % self.patch_size == 0 for s in self.image_size),
                f"{w}.image_size={self.image_size} must be positive multiples of patch_size={self.patch_size}")
        require(self.rope_ref_grid is None or all(s > 0 for s in self.rope_ref_grid),
                f"{w}.rope_ref_grid={self.rope_ref_grid} must be positive")
        require(0.0 <= self.drop_path_rate < 1.0, f"{w}.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        layers_to_run(self.output_layer, self.num_layers, f"{w}.output_layer")
        check_mean_std(self.pixel_mean, self.pixel_std, f"{w}.pixel_mean/pixel_std")
        check_numerics(self, w)
        check_attention_impl(self.attention_impl, self.splash_block, w)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.model") -> EVA02Config:
        return dataclass_from_config(cls, config, where)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    def visual_tokens_per_image(self) -> int:
        """Output tokens: the CLS token and one per patch."""
        return 1 + self.grid[0] * self.grid[1]

    def forward_flops(self, seq_len: int | None = None) -> float:
        """Forward FLOPs (2 per multiply-add) of one image at image_size; `seq_len` is ignored (no text)."""
        n, d, f = self.visual_tokens_per_image(), self.hidden_size, self.intermediate_size
        layers = layers_to_run(self.output_layer, self.num_layers, "output_layer")
        embed = 2 * (n - 1) * self.patch_size ** 2 * self.num_channels * d
        return float(embed + layers * n * (8 * d * d + 6 * d * f + 4 * n * d))


@functools.lru_cache(maxsize=16)
def rope_2d_tables(grid: tuple[int, int], head_dim: int, theta: float,
                   ref_grid: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos) [gh * gw, head_dim] in fp32, as timm's build_rotary_pos_embed(in_pixels=False)."""
    num_bands = head_dim // 4
    bands = (1.0 / theta ** (np.arange(num_bands, dtype=np.float32) / np.float32(num_bands))).astype(np.float32)
    coords = [np.arange(n, dtype=np.float32) for n in grid]
    if ref_grid is not None:
        coords = [c / np.float32(n) * np.float32(r) for c, n, r in zip(coords, grid, ref_grid)]
    ys, xs = np.meshgrid(*coords, indexing="ij")
    angles = np.stack([ys, xs], axis=-1)[..., None] * bands  # [gh, gw, 2, bands]
    angles = np.repeat(angles.reshape(grid[0] * grid[1], 2 * num_bands), 2, axis=-1)
    return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rope_interleaved(x: jax.Array, sin: np.ndarray, cos: np.ndarray) -> jax.Array:
    """x [B, N, H, D] * cos + rot(x) * sin with rot((a, b) pairs) = (-b, a), in fp32 (timm `apply_rot_embed_cat`)."""
    x32 = x.astype(jnp.float32)
    rotated = jnp.stack([-x32[..., 1::2], x32[..., ::2]], axis=-1).reshape(x.shape)
    return (x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]).astype(x.dtype)


class EVA02Attention(nnx.Module):
    """q (bias), k (no bias), v (bias); RoPE on the patch tokens; optional sub-LN before the output projection."""

    def __init__(self, cfg: EVA02Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=normal_init(0.02), rngs=rngs)
        d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        heads = dict(in_axes=("embed",), out_axes=("heads", "head_dim"))
        self.q_proj = Linear(d, (h, hd), use_bias=True, **heads, **kw)
        self.k_proj = Linear(d, (h, hd), use_bias=False, **heads, **kw)
        self.v_proj = Linear(d, (h, hd), use_bias=True, **heads, **kw)
        self.inner_norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                    rngs=rngs) if cfg.scale_attn_inner else None
        self.o_proj = Linear((h, hd), d, in_axes=("heads", "head_dim"), out_axes=("embed",), use_bias=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        sin, cos = rope_2d_tables(cfg.grid, cfg.head_dim, cfg.rope_theta, cfg.rope_ref_grid)
        q = checkpoint_name(self.q_proj(x), "query_proj")
        k = checkpoint_name(self.k_proj(x), "key_proj")
        v = checkpoint_name(self.v_proj(x), "value_proj")
        q = jnp.concatenate([q[:, :1], apply_rope_interleaved(q[:, 1:], sin, cos)], axis=1)
        k = jnp.concatenate([k[:, :1], apply_rope_interleaved(k[:, 1:], sin, cos)], axis=1)
        q = constrain(q, ("batch", "length", "act_heads", None))
        out = checkpoint_name(attend(q, k, v, impl=cfg.attention_impl, splash_block=cfg.splash_block), "attn_out")
        if self.inner_norm is not None:  # normalises over all heads together
            out = self.inner_norm(out.reshape(*out.shape[:2], cfg.hidden_size)).reshape(out.shape)
        return self.o_proj(out)


class EVA02SwiGLU(nnx.Module):
    """fc2(norm(silu(fc1_g(x)) * fc1_x(x))) with biases: timm `SwiGLU` (with its norm) when scale_mlp, else timm
    `GluMlp`, the same product without the norm (its packed fc1 is split on conversion)."""

    def __init__(self, cfg: EVA02Config, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=normal_init(0.02), use_bias=True,
                  rngs=rngs)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.fc1_g = Linear(d, f, in_axes=("embed",), out_axes=("mlp",), **kw)
        self.fc1_x = Linear(d, f, in_axes=("embed",), out_axes=("mlp",), **kw)
        self.norm = LayerNorm(f, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              rngs=rngs) if cfg.scale_mlp else None
        self.fc2 = Linear(f, d, in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(jax.nn.silu(self.fc1_g(x)) * self.fc1_x(x), ("batch", "length", "act_mlp"))
        if self.norm is not None:
            h = self.norm(h)
        return checkpoint_name(self.fc2(h), "mlp_out")


class EVA02Block(nnx.Module):
    """x + attn(norm1(x)); x + mlp(norm2(x)), each branch optionally drop-pathed (timm `EvaBlock`)."""

    def __init__(self, cfg: EVA02Config, *, rngs: nnx.Rngs):
        kw = dict(eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(cfg.hidden_size, **kw)
        self.attn = EVA02Attention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.hidden_size, **kw)
        self.mlp = EVA02SwiGLU(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, drop_rate: jax.Array | None = None, rng: jax.Array | None = None):
        keys = (None, None) if rng is None else jax.random.split(rng)
        for norm, branch, key in ((self.norm1, self.attn, keys[0]), (self.norm2, self.mlp, keys[1])):
            h = branch(norm(x))
            if key is not None:
                h = drop_path(h, drop_rate, key)
            x = constrain(x + h, TOKEN_AXES)
        return x


class EVA02VisionEncoder(nnx.Module):
    """NHWC pixels [B, H, W, C] at `image_size` -> tokens [B, 1 + gh * gw, D] (CLS first), timm's
    `forward_features` for output_layer=-1."""

    def __init__(self, cfg: EVA02Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, kw = cfg.hidden_size, dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.num_channels, d, use_bias=True, rngs=rngs, **kw)
        self.cls_token = param(rngs, normal_init(0.02), (d,), ("embed",), cfg.param_dtype, role=TOKEN)
        num_positions = 1 + cfg.grid[0] * cfg.grid[1]
        self.pos_embed = param(rngs, normal_init(0.02), (num_positions, d), ("positions", "embed"), cfg.param_dtype,
                               role=POSITION)
        self.layers = stack_layers(lambda r: EVA02Block(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm = LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, **kw) if cfg.final_norm else None

    def embed(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        if pixels.ndim != 4 or tuple(pixels.shape[1:3]) != tuple(cfg.image_size):
            raise ValueError(f"EVA02VisionEncoder: pixels {tuple(pixels.shape)} (NHWC) are not "
                             f"{cfg.image_size[0]}x{cfg.image_size[1]} (config.model.image_size); resize them")
        patches = self.patch_embed(pixels)
        b, gh, gw, d = patches.shape
        cls = jnp.broadcast_to(self.cls_token[...].astype(patches.dtype), (b, 1, d))
        x = jnp.concatenate([cls, patches.reshape(b, gh * gw, d)], axis=1)
        return constrain(x + self.pos_embed[...].astype(x.dtype), TOKEN_AXES)

    def __call__(self, pixels: jax.Array, *, deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array:
        """`deterministic=False` applies drop-path (when drop_path_rate > 0) and needs `rng` (a PRNG key)."""
        cfg = self.cfg
        train = not deterministic and cfg.drop_path_rate > 0
        if train and rng is None:
            raise ValueError("EVA02VisionEncoder: deterministic=False with drop_path_rate > 0 needs an `rng` key")
        x = run_blocks(self.layers, self.embed(pixels), layers_to_run(cfg.output_layer, cfg.num_layers,
                                                                        "output_layer"),
                       remat_policy=cfg.remat_policy, drop_path_rate=cfg.drop_path_rate if train else 0.0,
                       rng=rng if train else None)
        return self.norm(x) if cfg.output_layer == -1 and self.norm is not None else x
