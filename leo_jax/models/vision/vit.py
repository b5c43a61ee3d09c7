"""Pieces shared by the plain ViT encoders (CLIP, SigLIP, InternViT): patch embedding, the pre-LN transformer block
(optional layer scale and drop path), torch-exact bicubic resizing of position grids, and running the first n
layers of a scanned stack (LLaVA-style feature selection)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leo_jax.config import dataclass_from_config, require
from leo_jax.layers.attention import Attention, check_attention_impl
from leo_jax.layers.common import (
    BIAS,
    KERNEL,
    LAYER_SCALE,
    LayerNorm,
    check_numerics,
    fan_in_init,
    param,
    scan_layers,
    stack_layers,
    to_dtype,
    zeros_init,
)
from leo_jax.layers.conv import patch_conv
from leo_jax.layers.mlp import ACTIVATIONS, MLP
from leo_jax.layers.pixels import IMAGENET_MEAN, IMAGENET_STD, check_mean_std
from leo_jax.sharding import constrain

TOKEN_AXES = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Fields every plain ViT encoder has (CLIP, SigLIP and InternViT configs extend it; defaults: ViT-B/16)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    patch_size: int = 16
    image_size: int = 224  # the square size the position embeddings were trained for
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    output_layer: int = -1  # index into HF hidden_states: -1 = last layer, -2 = penultimate (LLaVA), 0 = embeddings
    # Std of the learned position embeddings at initialisation (HF's 0.02; pretrained weights replace them). Trained
    # from scratch, 0.02 is ~50x below the patch content and the layout never reaches the tokens' content.
    position_initializer_range: float = 0.02
    # RGB normalisation of the published checkpoint's inputs, (pixel / 255 - mean) / std, applied on device
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    # Attention kernel (leo_jax.layers.attention): xla | splash | cudnn | auto; splash_block: splash's block size.
    attention_impl: str = "auto"
    splash_block: int = 512

    def __post_init__(self):
        w = "config.model"
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size", "image_size",
                     "num_channels"):
            require(getattr(self, name) > 0, f"{w}.{name} must be positive, got {getattr(self, name)}")
        require(self.hidden_size % self.num_heads == 0,
                f"{w}.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        layers_to_run(self.output_layer, self.num_layers, f"{w}.output_layer")
        check_mean_std(self.pixel_mean, self.pixel_std, f"{w}.pixel_mean/pixel_std")
        require(self.hidden_act in ACTIVATIONS,
                f"{w}.hidden_act={self.hidden_act!r}: use one of {sorted(ACTIVATIONS)}")
        check_numerics(self, w)
        check_attention_impl(self.attention_impl, self.splash_block, w)

    @property
    def grid(self) -> int:
        """Patches per side of the trained position grid."""
        return self.image_size // self.patch_size

    def forward_flops(self, seq_len: int | None = None) -> float:
        """Forward FLOPs (2 per multiply-add) of one image at image_size through the layers that run (patch
        embedding, q/k/v/o, MLP, attention scores and mixing; CLS counted); `seq_len` is ignored."""
        n, d, f = self.grid ** 2 + 1, self.hidden_size, self.intermediate_size
        layers = layers_to_run(self.output_layer, self.num_layers, "output_layer")
        embed = 2 * (n - 1) * self.patch_size ** 2 * self.num_channels * d
        return float(embed + layers * n * (8 * d * d + 4 * d * f + 4 * n * d))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.model"):
        return dataclass_from_config(cls, config, where)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches of NHWC pixels -> [B, H//p, W//p, D]: a stride-p convolution as one matmul
    (`patch_conv`; kernel [p, p, C, D], torch Conv2d weight transposed). As torch's conv, pixels past the last whole
    patch are ignored (SigLIP so400m: 384 px = 27 patches of 14 + 6 unused)."""

    def __init__(self, patch_size: int, in_channels: int, features: int, *, use_bias: bool, dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs):
        self.patch_size, self.in_channels, self.dtype = patch_size, in_channels, to_dtype(dtype)
        self.kernel = param(rngs, fan_in_init(patch_size * patch_size * in_channels),
                            (patch_size, patch_size, in_channels, features),
                            ("kernel_hw", "kernel_hw", "conv_in", "conv_out"), param_dtype, role=KERNEL)
        self.bias = param(rngs, zeros_init, (features,), ("conv_out",), param_dtype, role=BIAS) if use_bias else None

    def __call__(self, pixels: jax.Array) -> jax.Array:
        b, h, w, c = pixels.shape
        p = self.patch_size
        if c != self.in_channels or h < p or w < p:
            raise ValueError(f"pixels of shape {tuple(pixels.shape)} (NHWC): expected {self.in_channels} channels and "
                             f"at least one {p}x{p} patch")
        y = patch_conv(pixels.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def check_image_size(pixels: jax.Array, image_size: int, interpolate: bool, where: str) -> None:
    """HF's rule: without position interpolation only image_size x image_size pixels are accepted."""
    if not interpolate and pixels.shape[1:3] != (image_size, image_size):
        raise ValueError(f"{where}: pixels {tuple(pixels.shape)} (NHWC) are not {image_size}x{image_size}; resize "
                         f"them or set config.model.interpolate_pos_encoding=True")


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's `interpolate(mode='bicubic', align_corners=False)` along one axis (cubic
    convolution with A=-0.75, source index (i + 0.5) * in/out - 0.5, taps clamped to the border)."""
    a = -0.75

    def near(t):  # |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t):  # 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    matrix = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        base = math.floor(src)
        t = src - base
        for offset, weight in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            matrix[i, min(max(base + offset, 0), in_size - 1)] += weight
    return matrix.astype(np.float32)


def resize_grid(grid: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """Bicubic resize of a [h, w, D] position grid to [out_h, out_w, D], exactly as HF's `interpolate_pos_encoding`
    (computed in fp32). Identity when the size is unchanged."""
    h, w = grid.shape[:2]
    if (h, w) == (out_h, out_w):
        return grid
    rows, cols = bicubic_matrix(h, out_h), bicubic_matrix(w, out_w)
    out = jnp.einsum("yh,xw,hwd->yxd", rows, cols, grid.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(grid.dtype)


def add_positions(patches: jax.Array, positions: jax.Array, grid: int) -> jax.Array:
    """patches [B, gh, gw, D] + the trained [grid * grid, D] position table (resized to gh x gw) -> [B, gh*gw, D]."""
    b, gh, gw, d = patches.shape
    pos = resize_grid(positions.reshape(grid, grid, d), gh, gw).reshape(gh * gw, d)
    return patches.reshape(b, gh * gw, d) + pos.astype(patches.dtype)


def prepend_class_token(tokens: jax.Array, cls: jax.Array) -> jax.Array:
    """[B, N, D] tokens with the vector `cls` [D] (class embedding + its position) put first -> [B, 1 + N, D]."""
    cls = jnp.broadcast_to(cls.astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
    return constrain(jnp.concatenate([cls, tokens], axis=1), TOKEN_AXES)


def drop_path(x: jax.Array, rate: jax.Array, rng: jax.Array) -> jax.Array:
    """Stochastic depth: zeroes whole samples of a residual branch with probability `rate`, rescaling the rest."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class ViTBlock(nnx.Module):
    """Pre-LN block: x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x)). Layer scale (`layer_scale_init` not
    None) and drop path are InternViT's; CLIP and SigLIP use neither."""

    def __init__(self, features: int, num_heads: int, mlp_hidden: int, *, act: str, eps: float, qkv_bias: bool,
                 layer_scale_init: float | None = None, attention_impl: str = "xla", splash_block: int = 512,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(features, eps=eps, rngs=rngs, **kw)
        self.attn = Attention(features, num_heads, num_heads, features // num_heads, qkv_bias=qkv_bias, out_bias=True,
                              attention_impl=attention_impl, splash_block=splash_block, rngs=rngs, **kw)
        self.norm2 = LayerNorm(features, eps=eps, rngs=rngs, **kw)
        self.mlp = MLP(features, mlp_hidden, act=act, rngs=rngs, **kw)
        if layer_scale_init is None:
            self.ls1 = self.ls2 = None
        else:
            init = jax.nn.initializers.constant(layer_scale_init)
            self.ls1 = param(rngs, init, (features,), ("norm",), param_dtype, role=LAYER_SCALE)
            self.ls2 = param(rngs, init, (features,), ("norm",), param_dtype, role=LAYER_SCALE)

    def __call__(self, x: jax.Array, *, drop_rate: jax.Array | None = None, rng: jax.Array | None = None):
        """x [B, N, D]. With `rng` (training), each residual branch is dropped per sample with `drop_rate`."""
        rngs = (None, None) if rng is None else jax.random.split(rng)
        for norm, branch, scale, key in ((self.norm1, lambda h: self.attn(h)[0], self.ls1, rngs[0]),
                                         (self.norm2, self.mlp, self.ls2, rngs[1])):
            h = branch(norm(x))
            if scale is not None:
                h = h * scale[...].astype(h.dtype)
            if key is not None:
                h = drop_path(h, drop_rate, key)
            x = constrain(x + h, TOKEN_AXES)
        return x


def block_stack(cfg: ViTConfig, rngs: nnx.Rngs, *, qkv_bias: bool = True,
                layer_scale_init: float | None = None) -> nnx.Module:
    """`cfg.num_layers` stacked ViTBlocks (run with `run_blocks`)."""
    return stack_layers(lambda r: ViTBlock(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, act=cfg.hidden_act,
                                           eps=cfg.layer_norm_eps, qkv_bias=qkv_bias,
                                           layer_scale_init=layer_scale_init, attention_impl=cfg.attention_impl,
                                           splash_block=cfg.splash_block, dtype=cfg.dtype,
                                           param_dtype=cfg.param_dtype, rngs=r),
                        cfg.num_layers, rngs)


def layers_to_run(output_layer: int, num_layers: int, where: str) -> int:
    """How many layers produce HF's `hidden_states[output_layer]` (index 0 = the embeddings, -1 = the last layer)."""
    n = output_layer if output_layer >= 0 else num_layers + 1 + output_layer
    if not 0 <= n <= num_layers:
        raise ValueError(f"{where}={output_layer} is out of range for {num_layers} layers "
                         f"(use -{num_layers + 1}..{num_layers}; -1 = last layer, -2 = penultimate)")
    return n


def slice_stack(stack: nnx.Module, start: int, stop: int) -> nnx.Module:
    """The layers [start, stop) of a `stack_layers` stack, as a stack of its own (parameters are not copied)."""
    graphdef, state = nnx.split(stack)
    total = jax.tree.leaves(state)[0].shape[0]
    if (start, stop) == (0, total):
        return stack
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))


def run_blocks(stack: nnx.Module, x: jax.Array, num_run: int, *, remat_policy: str, drop_path_rate: float = 0.0,
               rng: jax.Array | None = None) -> jax.Array:
    """Scans the first `num_run` ViTBlocks of `stack` over x. With `rng` and drop_path_rate > 0, stochastic depth
    rises linearly over the stack's layers from 0 to drop_path_rate (as timm / InternViT)."""
    if num_run == 0:
        return x
    total = jax.tree.leaves(nnx.state(stack))[0].shape[0]
    stack = slice_stack(stack, 0, num_run)
    if rng is None or drop_path_rate == 0.0:
        return scan_layers(stack, lambda layer, h, _: (layer(h), None), x, remat_policy=remat_policy)[0]
    rates = jnp.linspace(0.0, drop_path_rate, total, dtype=jnp.float32)[:num_run]
    keys = jax.random.split(rng, num_run)
    def body(layer, h, xs):
        return (layer(h, drop_rate=xs[0], rng=xs[1]), None)
    return scan_layers(stack, body, x, (rates, keys), remat_policy=remat_policy)[0]
