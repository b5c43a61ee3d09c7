"""SAM ViT image encoder (transformers `SamVisionModel`; LEO's second encoder): patch embedding + absolute position
grid, pre-LN blocks with decomposed relative positions, windowed attention (window 14, padded to whole windows)
except at the global layers, and the conv neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) to 256 channels.

Returns the neck map NHWC [B, H/p, W/p, C] (HF's NCHW `last_hidden_state` transposed), e.g. [B, 64, 64, 256] at
1024 px. Windowed and global layers have differently sized relative-position tables (2*window-1 vs 2*grid-1 rows),
so they live in two stacks, each scanned; the forward walks the layer order as runs of consecutive same-kind layers
(SAM-L: 5 windowed, 1 global, x4), scanning the matching slice of its stack for each run. Global attention over
the 64x64 grid can be computed a few query rows at a time (`global_query_chunk_rows`) to bound its memory.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from leo_jax.config import dataclass_from_config, require
from leo_jax.layers.attention import attend, check_attention_impl, dot_product_attention, log_fallback
from leo_jax.layers.common import (
    KERNEL,
    POSITION,
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
from leo_jax.layers.mlp import ACTIVATIONS, MLP
from leo_jax.layers.pixels import IMAGENET_MEAN, IMAGENET_STD, check_mean_std
from leo_jax.models.vision.vit import PatchEmbed, slice_stack
from leo_jax.sharding import constrain

MAP_AXES = ("batch", None, None, "act_embed")  # NHWC activations


@dataclasses.dataclass(frozen=True)
class SamVisionConfig:
    """Field names follow transformers' SamVisionConfig (num_layers/num_heads shortened); defaults: SAM ViT-B."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 16
    image_size: int = 1024  # inputs must be exactly image_size x image_size (pad to it, as SAM's processor does)
    num_channels: int = 3
    output_channels: int = 256
    window_size: int = 14  # 0 = every layer attends globally
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    # Global layers attend this many query rows of the grid at a time (0 = all): same result, peak logits memory
    # [B, heads, rows*grid, grid^2] instead of [B, heads, grid^2, grid^2] (SAM-L at 1024 px: 1 GiB fp32 per image
    # at once; 16 rows: 256 MiB). Must divide image_size // patch_size.
    global_query_chunk_rows: int = 0
    # RGB normalisation of the published checkpoint's inputs, (pixel / 255 - mean) / std, applied on device
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    # Attention kernel (leo_jax.layers.attention): xla | splash | cudnn | auto; splash_block: splash's block size.
    # The kernels take no additive bias, so with use_rel_pos (SAM's decomposed relative positions) SAM runs xla.
    attention_impl: str = "auto"
    splash_block: int = 512

    def __post_init__(self):
        w = "config.model"
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_dim", "patch_size", "image_size",
                     "output_channels"):
            require(getattr(self, name) > 0, f"{w}.{name} must be positive, got {getattr(self, name)}")
        require(self.hidden_size % self.num_heads == 0,
                f"{w}.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        require(self.window_size >= 0, f"{w}.window_size must be >= 0, got {self.window_size}")
        require(self.global_query_chunk_rows >= 0 and (self.global_query_chunk_rows == 0
                                                       or self.grid % self.global_query_chunk_rows == 0),
                f"{w}.global_query_chunk_rows={self.global_query_chunk_rows} must be 0 or divide the patch grid "
                f"{self.grid} (= image_size // patch_size)")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_layers]
        require(not bad and len(set(self.global_attn_indexes)) == len(self.global_attn_indexes),
                f"{w}.global_attn_indexes={self.global_attn_indexes} must be distinct layer indexes in "
                f"[0, {self.num_layers})")
        require(self.hidden_act in ACTIVATIONS, f"{w}.hidden_act={self.hidden_act!r}: use one of {sorted(ACTIVATIONS)}")
        check_mean_std(self.pixel_mean, self.pixel_std, f"{w}.pixel_mean/pixel_std")
        check_numerics(self, w)
        check_attention_impl(self.attention_impl, self.splash_block, w)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def forward_flops(self, seq_len: int | None = None) -> float:
        """Forward FLOPs (2 per multiply-add) of one image: patch embedding, per layer q/k/v/o + MLP on every token
        and attention within (padded) windows or over the whole grid, then the neck's 1x1 and 3x3 convolutions."""
        g, d = self.grid, self.hidden_size
        n = g * g
        flops = 2 * n * self.patch_size ** 2 * self.num_channels * d
        for layer in range(self.num_layers):
            flops += 2 * n * (4 * d * d + 2 * d * self.mlp_dim)
            if self.is_global(layer):
                flops += 4 * n * n * d
            else:
                windows = (-(-g // self.window_size)) ** 2  # ceil(g / window) per side, squared
                flops += windows * 4 * self.window_size ** 4 * d
        c = self.output_channels
        return float(flops + 2 * n * d * c + 2 * n * 9 * c * c)

    def is_global(self, layer: int) -> bool:
        return self.window_size == 0 or layer in self.global_attn_indexes

    @property
    def global_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_global(i))

    @property
    def window_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if not self.is_global(i))

    def runs(self) -> list[tuple[bool, int, int]]:
        """The layer order as runs (is_global, start, stop) of slots in the global / windowed stack."""
        out, seen = [], {True: 0, False: 0}
        for is_global, group in itertools.groupby(range(self.num_layers), self.is_global):
            n = len(list(group))
            out.append((is_global, seen[is_global], seen[is_global] + n))
            seen[is_global] += n
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.model") -> SamVisionConfig:
        return dataclass_from_config(cls, config, where)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """[B, H, W, D] -> [B * nH * nW, window, window, D], zero-padding H and W up to multiples of the window."""
    b, h, w, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, -h % window), (0, -w % window), (0, 0)))
    nh, nw = x.shape[1] // window, x.shape[2] // window
    x = x.reshape(b, nh, window, nw, window, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * nh * nw, window, window, d)


def window_unpartition(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
    """Inverse of `window_partition`, dropping the padding -> [B, height, width, D]."""
    nh, nw = -(-height // window), -(-width // window)
    d = windows.shape[-1]
    x = windows.reshape(-1, nh, nw, window, window, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, nh * window, nw * window, d)[:, :height, :width]


def relative_table(rel_pos: jax.Array, q_rows: jax.Array, size: int) -> jax.Array:
    """[2*size-1, hd] table -> [len(q_rows), size(k), hd] with entry rel_pos[q - k + size - 1] for the query
    coordinates `q_rows` (HF's get_rel_pos when query and key sizes equal the table's, i.e. no resizing)."""
    return rel_pos[q_rows[:, None] - jnp.arange(size)[None, :] + size - 1]


class SamAttention(nnx.Module):
    """Multi-head self-attention over a square [B, S, S, D] map (a window or the whole grid), with decomposed
    relative positions: logits[q, k] += <q, R_h[qy - ky]> + <q, R_w[qx - kx]> (MViTv2 / SAM).

    With `query_chunk_rows` c, queries are attended c grid rows at a time (lax.map), so the logits held at once are
    [B, H, c*S, S*S] instead of [B, H, S*S, S*S]: the same result with S/c times less peak memory."""

    def __init__(self, cfg: SamVisionConfig, size: int, query_chunk_rows: int = 0, *, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.num_heads
        hd = d // h
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.size = size
        self.attention_impl, self.splash_block = cfg.attention_impl, cfg.splash_block
        self.query_chunk_rows = query_chunk_rows if 0 < query_chunk_rows < size else size
        self.q_proj, self.k_proj, self.v_proj = (
            Linear(d, (h, hd), in_axes=("embed",), out_axes=("heads", "head_dim"), use_bias=cfg.qkv_bias, **kw)
            for _ in range(3))
        self.o_proj = Linear((h, hd), d, in_axes=("heads", "head_dim"), out_axes=("embed",), use_bias=True, **kw)
        if cfg.use_rel_pos:
            self.rel_pos_h = param(rngs, zeros_init, (2 * size - 1, hd), ("positions", "head_dim"),
                                   cfg.param_dtype, role=POSITION)
            self.rel_pos_w = param(rngs, zeros_init, (2 * size - 1, hd), ("positions", "head_dim"),
                                   cfg.param_dtype, role=POSITION)
        else:
            self.rel_pos_h = self.rel_pos_w = None

    def _attend(self, q: jax.Array, rows: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """Queries of grid rows `rows` (q [B, c, S, H, hd]) over all keys (k, v [B, S*S, H, hd])."""
        b, c, s = q.shape[:3]
        if self.rel_pos_h is None:
            out = attend(q.reshape(b, c * s, *q.shape[3:]), k, v, impl=self.attention_impl,
                         splash_block=self.splash_block)
            return out.reshape(q.shape)
        if self.attention_impl != "xla":
            log_fallback(f"SAM attention_impl={self.attention_impl}: the decomposed relative-position bias needs the "
                         f"materialised logits, so SAM's attention runs on xla")
        rh = relative_table(self.rel_pos_h[...], rows, s).astype(q.dtype)
        rw = relative_table(self.rel_pos_w[...], jnp.arange(s), s).astype(q.dtype)
        rel_h = jnp.einsum("byxnc,ykc->bnyxk", q, rh, preferred_element_type=jnp.float32)
        rel_w = jnp.einsum("byxnc,xkc->bnyxk", q, rw, preferred_element_type=jnp.float32)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, -1, c * s, s * s)
        out = dot_product_attention(q.reshape(b, c * s, *q.shape[3:]), k, v, bias=bias)
        return out.reshape(q.shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, s = x.shape[:2]
        if s != self.size or x.shape[2] != self.size:
            raise ValueError(f"SamAttention built for {self.size}x{self.size} maps got {x.shape[1:3]}")
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, S, S, H, hd]
        heads = q.shape[-2:]
        k, v = k.reshape(b, s * s, *heads), v.reshape(b, s * s, *heads)
        c = self.query_chunk_rows
        if c == s:
            out = self._attend(q, jnp.arange(s), k, v)
        else:
            chunks = jnp.moveaxis(q.reshape(b, s // c, c, s, *heads), 1, 0)
            rows = jnp.arange(s).reshape(s // c, c)
            out = jax.lax.map(lambda args: self._attend(args[0], args[1], k, v), (chunks, rows))
            out = jnp.moveaxis(out, 0, 1).reshape(q.shape)
        return self.o_proj(out)


class SamBlock(nnx.Module):
    """x + attn(norm1(x)) (within windows unless `window` is 0), then x + mlp(norm2(x)); x is NHWC."""

    def __init__(self, cfg: SamVisionConfig, window: int, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.window = window
        self.norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.attn = SamAttention(cfg, window or cfg.grid, 0 if window else cfg.global_query_chunk_rows, rngs=rngs)
        self.norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.mlp = MLP(cfg.hidden_size, cfg.mlp_dim, act=cfg.hidden_act, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm1(x)
        if self.window:
            h = window_unpartition(self.attn(window_partition(h, self.window)), self.window, x.shape[1], x.shape[2])
        else:
            h = self.attn(h)
        x = constrain(x + h, MAP_AXES)
        return constrain(x + self.mlp(self.norm2(x)), MAP_AXES)


class Conv(nnx.Module):
    """Bias-free stride-1 'same' convolution on NHWC maps (kernel [k, k, in, out], torch Conv2d transposed)."""

    def __init__(self, in_features: int, out_features: int, kernel: int, *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        self.dtype = to_dtype(dtype)
        self.kernel = param(rngs, normal_init(0.02), (kernel, kernel, in_features, out_features),
                            ("kernel_hw", "kernel_hw", "conv_in", "conv_out"), param_dtype, role=KERNEL)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype), (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class SamNeck(nnx.Module):
    """1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d (channel LayerNorms with eps 1e-6, as SamLayerNorm)."""

    def __init__(self, cfg: SamVisionConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        c = cfg.output_channels
        self.conv1 = Conv(cfg.hidden_size, c, 1, **kw)
        self.norm1 = LayerNorm(c, eps=1e-6, **kw)
        self.conv2 = Conv(c, c, 3, **kw)
        self.norm2 = LayerNorm(c, eps=1e-6, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm2(self.conv2(self.norm1(self.conv1(x))))


class SamVisionEncoder(nnx.Module):
    """NHWC pixels [B, image_size, image_size, C] -> neck map [B, grid, grid, output_channels]."""

    def __init__(self, cfg: SamVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.num_channels, d, use_bias=True, dtype=cfg.dtype,
                                      param_dtype=cfg.param_dtype, rngs=rngs)
        self.pos_embed = param(rngs, zeros_init, (1, cfg.grid, cfg.grid, d),
                               (None, "positions", "positions", "embed"), cfg.param_dtype,
                               role=POSITION) if cfg.use_abs_pos else None
        def make(window, n):
            return stack_layers(lambda r: SamBlock(cfg, window, rngs=r), n, rngs) if n else None
        self.window_layers = make(cfg.window_size, len(cfg.window_layers))
        self.global_layers = make(0, len(cfg.global_layers))
        self.neck = SamNeck(cfg, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        if pixels.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"SamVisionEncoder: pixels {tuple(pixels.shape)} (NHWC) are not {cfg.image_size}x"
                             f"{cfg.image_size}; resize the longest side to {cfg.image_size} and pad (SAM's "
                             f"preprocessing)")
        x = self.patch_embed(pixels)
        if self.pos_embed is not None:
            x = x + self.pos_embed[...].astype(x.dtype)
        x = constrain(x, MAP_AXES)
        for is_global, start, stop in cfg.runs():
            stack = slice_stack(self.global_layers if is_global else self.window_layers, start, stop)
            x, _ = scan_layers(stack, lambda layer, h, _: (layer(h), None), x, remat_policy=cfg.remat_policy)
        return constrain(self.neck(x), MAP_AXES)
