"""ConvNeXt (transformers `ConvNextModel`): a 4x4/4 stem, then stages of depthwise-7x7 residual blocks.

Each stage (a downsampling LayerNorm + 2x2/2 conv, except the first) has its own width, so the four stages are a
python loop while the identical blocks inside a stage are stacked and run with `lax.scan`. Feature maps are NHWC
throughout; "channels-first" LayerNorms of the torch code are plain last-axis LayerNorms here. LEO-MINI reads one
stage's map (`output_stage`) and resizes it to its token grid; `return_stages=True` gives every stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leo_jax.config import dataclass_from_config, require
from leo_jax.layers.common import (
    BIAS,
    KERNEL,
    LAYER_SCALE,
    LayerNorm,
    Linear,
    check_numerics,
    normal_init,
    param,
    scan_layers,
    stack_layers,
    to_dtype,
    zeros_init,
)
from leo_jax.layers.conv import depthwise_conv, patch_conv
from leo_jax.layers.mlp import activation
from leo_jax.layers.pixels import IMAGENET_MEAN, IMAGENET_STD, check_mean_std
from leo_jax.models.vision.vit import drop_path
from leo_jax.sharding import constrain

MAP_AXES = ("batch", None, None, "act_embed")  # NHWC activations


@dataclasses.dataclass(frozen=True)
class ConvNextConfig:
    """Architecture (field names as transformers' ConvNextConfig) and numerics of a ConvNeXt."""

    hidden_sizes: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (3, 3, 9, 3)
    num_channels: int = 3
    patch_size: int = 4
    hidden_act: str = "gelu"
    layer_scale_init_value: float = 1e-6  # 0 = no layer scale parameter
    layer_norm_eps: float = 1e-12  # the final (pooler) LayerNorm only; the others use 1e-6 as in transformers
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly from 0 over all blocks (training only)
    initializer_range: float = 0.02
    image_size: int = 224  # nominal input size (FLOP counts); any size of at least the total stride works
    output_stage: int = -1  # the stage whose map `__call__` returns (python index into the stages)
    checkpoint_prefix: str = ""  # checkpoint layout only: 'convnext.' for ConvNextForImageClassification files
    # RGB normalisation of the published checkpoint's inputs, (pixel / 255 - mean) / std, applied on device
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat_policy: str = "none"

    def __post_init__(self):
        w = "config.model"
        require(len(self.hidden_sizes) == len(self.depths) and len(self.depths) > 0,
                f"{w}.hidden_sizes {self.hidden_sizes} and {w}.depths {self.depths} need the same (non-zero) length")
        require(all(d > 0 for d in self.depths), f"{w}.depths must all be positive, got {self.depths}")
        require(all(h > 0 for h in self.hidden_sizes), f"{w}.hidden_sizes must be positive, got {self.hidden_sizes}")
        require(-len(self.depths) <= self.output_stage < len(self.depths),
                f"{w}.output_stage={self.output_stage} is out of range for {len(self.depths)} stages")
        require(0.0 <= self.drop_path_rate < 1.0, f"{w}.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        activation(self.hidden_act)
        check_mean_std(self.pixel_mean, self.pixel_std, f"{w}.pixel_mean/pixel_std")
        check_numerics(self, w)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.model") -> ConvNextConfig:
        return dataclass_from_config(cls, config, where)

    @property
    def total_stride(self) -> int:
        return self.patch_size * 2 ** (len(self.depths) - 1)

    def stage_sides(self, size: int | None = None) -> list[int]:
        """Side of each stage's map for a square `size` input (default image_size); convolutions floor."""
        side = (size or self.image_size) // self.patch_size
        return [side // 2 ** i for i in range(len(self.depths))]

    def visual_tokens_per_image(self) -> int:
        """Positions of the `output_stage` map at image_size (LEO-MINI resizes them to its own grid)."""
        return self.stage_sides()[self.output_stage] ** 2

    def forward_flops(self, seq_len: int | None = None) -> float:
        """Forward FLOPs (2 per multiply-add) of one image at image_size up to `output_stage`; `seq_len` is
        ignored (there is no text)."""
        sides, dims = self.stage_sides(), self.hidden_sizes
        flops = 2 * sides[0] ** 2 * self.patch_size ** 2 * self.num_channels * dims[0]
        for i in range(range(len(self.depths))[self.output_stage] + 1):
            if i > 0:
                flops += 2 * sides[i] ** 2 * 4 * dims[i - 1] * dims[i]
            flops += self.depths[i] * sides[i] ** 2 * (2 * 49 * dims[i] + 16 * dims[i] ** 2)  # dwconv + 2 pw
        return float(flops)

    def drop_path_rates(self) -> list[np.ndarray]:
        """Per-stage block rates: linspace(0, drop_path_rate, all blocks) split by stage (as transformers)."""
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths), dtype=np.float32)
        return np.split(rates, np.cumsum(self.depths)[:-1])


class Conv2d(nnx.Module):
    """NHWC convolution with an HWIO kernel ('kernel_hw','kernel_hw','conv_in','conv_out'); `groups` as torch."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
                 groups: int = 1, use_bias: bool = True, dtype: Any, param_dtype: Any, init_std: float = 0.02,
                 rngs: nnx.Rngs):
        self.stride, self.padding, self.groups, self.dtype = stride, padding, groups, to_dtype(dtype)
        self.kernel = param(rngs, normal_init(init_std), (kernel_size, kernel_size, in_features // groups,
                                                          out_features),
                            ("kernel_hw", "kernel_hw", "conv_in", "conv_out"), param_dtype, role=KERNEL)
        self.bias = param(rngs, zeros_init, (out_features,), ("conv_out",), param_dtype,
                          role=BIAS) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        k, _, in_per_group, _ = kernel.shape
        if self.stride == k and self.padding == 0 and self.groups == 1:  # the stem and downsampling: patches
            y = patch_conv(x, kernel)
        elif self.stride == 1 and in_per_group == 1 and self.groups == x.shape[-1]:  # the blocks' 7x7 depthwise
            y = depthwise_conv(x, kernel, self.padding)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), [(self.padding, self.padding)] * 2,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=self.groups)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class ConvNextBlock(nnx.Module):
    """x + layer_scale * pw2(act(pw1(LN(dwconv7x7(x))))) (transformers `ConvNextLayer`)."""

    def __init__(self, cfg: ConvNextConfig, dim: int, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        init = normal_init(cfg.initializer_range)
        self.dwconv = Conv2d(dim, dim, 7, padding=3, groups=dim, init_std=cfg.initializer_range, rngs=rngs, **kw)
        self.norm = LayerNorm(dim, eps=1e-6, rngs=rngs, **kw)
        self.pwconv1 = Linear(dim, 4 * dim, in_axes=("embed",), out_axes=("mlp",), use_bias=True, kernel_init=init,
                              rngs=rngs, **kw)
        self.pwconv2 = Linear(4 * dim, dim, in_axes=("mlp",), out_axes=("embed",), use_bias=True, kernel_init=init,
                              rngs=rngs, **kw)
        self.act = activation(cfg.hidden_act)
        self.layer_scale = None if cfg.layer_scale_init_value <= 0 else param(
            rngs, jax.nn.initializers.constant(cfg.layer_scale_init_value), (dim,), ("norm",), cfg.param_dtype,
            role=LAYER_SCALE)

    def __call__(self, x: jax.Array, drop: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        h = self.pwconv1(self.norm(self.dwconv(x)))
        h = self.pwconv2(constrain(self.act(h), ("batch", None, None, "act_mlp")))
        if self.layer_scale is not None:
            h = h * self.layer_scale[...].astype(h.dtype)
        if drop is not None:
            h = drop_path(h, *drop)
        return constrain(x + h, MAP_AXES)


class ConvNextStage(nnx.Module):
    """Optional downsampling (LayerNorm + 2x2/2 conv) then `depth` scanned blocks of width `dim`."""

    def __init__(self, cfg: ConvNextConfig, in_dim: int, dim: int, depth: int, downsample: bool, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.downsample_norm = LayerNorm(in_dim, eps=1e-6, rngs=rngs, **kw) if downsample else None
        self.downsample = Conv2d(in_dim, dim, 2, stride=2, init_std=cfg.initializer_range, rngs=rngs,
                                 **kw) if downsample else None
        self.blocks = stack_layers(lambda r: ConvNextBlock(cfg, dim, rngs=r), depth, rngs)

    def __call__(self, x: jax.Array, *, drop_rates: np.ndarray, rng: jax.Array | None, remat_policy: str):
        if self.downsample is not None:
            x = self.downsample(self.downsample_norm(x))
        x = constrain(x, MAP_AXES)
        if rng is None:
            x, _ = scan_layers(self.blocks, lambda block, h, _: (block(h), None), x, remat_policy=remat_policy)
            return x
        keys = jax.random.split(rng, len(drop_rates))
        x, _ = scan_layers(self.blocks, lambda block, h, drop: (block(h, drop), None), x,
                           (jnp.asarray(drop_rates), keys), remat_policy=remat_policy)
        return x


class ConvNext(nnx.Module):
    """Normalised pixels NHWC [B, H, W, C] -> the `output_stage` map NHWC [B, H/s, W/s, C_s] (default: the last
    stage, transformers' `last_hidden_state` transposed to NHWC); `return_stages=True` -> every stage's map."""

    def __init__(self, cfg: ConvNextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.stem = Conv2d(cfg.num_channels, cfg.hidden_sizes[0], cfg.patch_size, stride=cfg.patch_size,
                           init_std=cfg.initializer_range, rngs=rngs, **kw)
        self.stem_norm = LayerNorm(cfg.hidden_sizes[0], eps=1e-6, rngs=rngs, **kw)
        dims = (cfg.hidden_sizes[0],) + tuple(cfg.hidden_sizes)
        self.stages = nnx.List([ConvNextStage(cfg, dims[i], dims[i + 1], depth, downsample=i > 0, rngs=rngs)
                                for i, depth in enumerate(cfg.depths)])
        # transformers' pooler norm (over the mean of the last map): kept so checkpoints round-trip; see `pooled`.
        self.pool_norm = LayerNorm(cfg.hidden_sizes[-1], eps=cfg.layer_norm_eps, rngs=rngs, **kw)

    def __call__(self, pixels: jax.Array, *, return_stages: bool = False, deterministic: bool = True,
                 rng: jax.Array | None = None) -> jax.Array | list[jax.Array]:
        """`deterministic=False` applies drop-path and needs `rng` (a PRNG key)."""
        cfg = self.cfg
        if pixels.ndim != 4 or pixels.shape[-1] != cfg.num_channels:
            raise ValueError(f"ConvNext expects NHWC pixels [B, H, W, {cfg.num_channels}], got shape {pixels.shape}")
        if min(pixels.shape[1:3]) < cfg.total_stride:  # other sizes are floored per stage, as torch's convolutions
            raise ValueError(f"ConvNext input {pixels.shape[1]}x{pixels.shape[2]} is smaller than the total stride "
                             f"{cfg.total_stride}: the last stage would be empty")
        if not deterministic and rng is None and cfg.drop_path_rate > 0:
            raise ValueError("ConvNext: deterministic=False with drop_path_rate > 0 needs an `rng` key")
        use_drop = not deterministic and cfg.drop_path_rate > 0
        last = range(len(cfg.depths))[cfg.output_stage]
        x = self.stem_norm(self.stem(constrain(pixels, MAP_AXES)))
        rngs = jax.random.split(rng, len(self.stages)) if use_drop else [None] * len(self.stages)
        outputs = []
        for i, (stage, rates) in enumerate(zip(self.stages, cfg.drop_path_rates())):
            x = stage(x, drop_rates=rates, rng=rngs[i], remat_policy=cfg.remat_policy)
            outputs.append(x)
            if i == last and not return_stages:
                return x
        return outputs

    def pooled(self, last_map: jax.Array) -> jax.Array:
        """transformers' `pooler_output`: LayerNorm of the spatial mean of the last stage map [B, C]."""
        return self.pool_norm(jnp.mean(last_map.astype(jnp.float32), axis=(1, 2)))

