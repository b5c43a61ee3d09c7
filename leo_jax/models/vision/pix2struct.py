"""Pix2Struct's vision encoder (transformers `Pix2StructVisionModel`): variable-resolution patches.

The input is what Pix2Struct's image processor makes: `flattened_patches` [B, P, 2 + p*p*C] whose first two
columns are each patch's row and column index (1-based; padding rows are all zero) and an `attention_mask` [B, P].
P is the static max-patches budget. Patches are projected, row and column embeddings added, then T5-style blocks:
RMS norms without bias, attention without biases or 1/sqrt(d) scaling, and a gated-GELU MLP (wi_0, wi_1, wo).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from leo_jax.config import dataclass_from_config, require
from leo_jax.layers.attention import Attention, Segments, attend, check_attention_impl
from leo_jax.layers.common import (
    POSITION,
    Linear,
    RMSNorm,
    check_numerics,
    normal_init,
    param,
    scan_layers,
    stack_layers,
)
from leo_jax.layers.mlp import activation
from leo_jax.models.vision.vit import TOKEN_AXES, layers_to_run, slice_stack
from leo_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class Pix2StructVisionConfig:
    """Architecture (transformers Pix2StructVisionConfig, with leo_jax activation names) and numerics."""

    hidden_size: int = 768
    patch_embed_hidden_size: int = 768  # p * p * C of a flattened patch (16 * 16 * 3)
    d_ff: int = 2048
    d_kv: int = 64
    num_layers: int = 12
    num_heads: int = 12
    hidden_act: str = "gelu_tanh"  # transformers 'gelu_new'
    layer_norm_eps: float = 1e-6
    seq_len: int = 4096  # rows of the row/column embedding tables: the largest patch index + 1
    max_patches: int = 2048  # the static patch budget P the data pipeline pads to (inputs may not exceed it)
    initializer_range: float = 0.02
    output_layer: int = -1  # -1: last_hidden_state (after the final norm); else HF hidden_states[output_layer]
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    # Attention kernel (leo_jax.layers.attention): xla | splash | cudnn | auto; splash_block: splash's block size.
    attention_impl: str = "auto"
    splash_block: int = 512

    def __post_init__(self):
        w = "config.model"
        for name in ("hidden_size", "patch_embed_hidden_size", "d_ff", "d_kv", "num_layers", "num_heads", "seq_len",
                     "max_patches"):
            require(getattr(self, name) > 0, f"{w}.{name} must be positive, got {getattr(self, name)}")
        layers_to_run(self.output_layer, self.num_layers, f"{w}.output_layer")
        activation(self.hidden_act)
        check_numerics(self, w)
        check_attention_impl(self.attention_impl, self.splash_block, w)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.model") -> Pix2StructVisionConfig:
        return dataclass_from_config(cls, config, where)

    def visual_tokens_per_image(self) -> int:
        return self.max_patches

    def forward_flops(self, seq_len: int | None = None) -> float:
        """Forward FLOPs (2 per multiply-add) of one image's `max_patches` patches; `seq_len` is ignored."""
        n, d, inner = self.max_patches, self.hidden_size, self.num_heads * self.d_kv
        layers = layers_to_run(self.output_layer, self.num_layers, "output_layer")
        per_layer = n * (8 * d * inner + 6 * d * self.d_ff + 4 * n * inner)
        return float(2 * n * self.patch_embed_hidden_size * d + layers * per_layer)


class Pix2StructLayer(nnx.Module):
    """x + attn(rms(x)); x + wo(act(wi_0(rms(x))) * wi_1(rms(x)))."""

    def __init__(self, cfg: Pix2StructVisionConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        init = normal_init(cfg.initializer_range)
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs, **kw)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_heads, cfg.d_kv, init_std=cfg.initializer_range,
                              rngs=rngs, **kw)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs, **kw)
        self.wi_0 = Linear(cfg.hidden_size, cfg.d_ff, in_axes=("embed",), out_axes=("mlp",), kernel_init=init,
                           rngs=rngs, **kw)
        self.wi_1 = Linear(cfg.hidden_size, cfg.d_ff, in_axes=("embed",), out_axes=("mlp",), kernel_init=init,
                           rngs=rngs, **kw)
        self.wo = Linear(cfg.d_ff, cfg.hidden_size, in_axes=("mlp",), out_axes=("embed",), kernel_init=init,
                         rngs=rngs, **kw)
        self.act = activation(cfg.hidden_act)
        self.attention_impl, self.splash_block = cfg.attention_impl, cfg.splash_block

    def attention(self, x: jax.Array, segments: Segments) -> jax.Array:
        """T5-style: no 1/sqrt(d_kv) scaling of the logits (it is folded into the trained weights)."""
        attn = self.attn
        q = checkpoint_name(attn.q_proj(x), "query_proj")
        k = checkpoint_name(attn.k_proj(x), "key_proj")
        v = checkpoint_name(attn.v_proj(x), "value_proj")
        q = constrain(q, ("batch", "length", "act_heads", None))
        out = attend(q, k, v, impl=self.attention_impl, splash_block=self.splash_block, segments=segments, scale=1.0)
        out = checkpoint_name(out, "attn_out")
        return attn.o_proj(out)

    def __call__(self, x: jax.Array, segments: Segments) -> jax.Array:
        x = constrain(x + self.attention(self.attn_norm(x), segments), TOKEN_AXES)
        h = self.mlp_norm(x)
        h = constrain(self.act(self.wi_0(h)) * self.wi_1(h), ("batch", "length", "act_mlp"))
        return constrain(x + checkpoint_name(self.wo(h), "mlp_out"), TOKEN_AXES)


class Pix2StructVisionEncoder(nnx.Module):
    """(flattened_patches [B, P, 2 + p*p*C], attention_mask [B, P] or None) -> tokens [B, P, D].

    Without a mask, patches whose values sum to 0 are padding (as transformers). Padding positions get outputs too
    (they attend to the real patches); consumers must mask them."""

    def __init__(self, cfg: Pix2StructVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, kw = cfg.hidden_size, dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        init = normal_init(cfg.initializer_range)
        self.patch_projection = Linear(cfg.patch_embed_hidden_size, d, in_axes=("patch",), out_axes=("embed",),
                                       use_bias=True, kernel_init=init, rngs=rngs, **kw)
        self.row_embedding = param(rngs, init, (cfg.seq_len, d), ("positions", "embed"), cfg.param_dtype,
                                   role=POSITION)
        self.column_embedding = param(rngs, init, (cfg.seq_len, d), ("positions", "embed"), cfg.param_dtype,
                                      role=POSITION)
        self.layers = stack_layers(lambda r: Pix2StructLayer(cfg, rngs=r), cfg.num_layers, rngs)
        self.final_norm = RMSNorm(d, eps=cfg.layer_norm_eps, rngs=rngs, **kw)

    def embed(self, flattened_patches: jax.Array) -> jax.Array:
        rows = flattened_patches[..., 0].astype(jnp.int32)
        cols = flattened_patches[..., 1].astype(jnp.int32)
        x = self.patch_projection(flattened_patches[..., 2:])
        x = x + jnp.take(self.row_embedding[...], rows, axis=0).astype(x.dtype)
        x = x + jnp.take(self.column_embedding[...], cols, axis=0).astype(x.dtype)
        return constrain(x, TOKEN_AXES)

    def __call__(self, flattened_patches: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        width = 2 + cfg.patch_embed_hidden_size
        if flattened_patches.ndim != 3 or flattened_patches.shape[-1] != width:
            raise ValueError(f"Pix2StructVisionEncoder expects flattened_patches [B, P, {width}] (row, column, "
                             f"{cfg.patch_embed_hidden_size} patch values), got shape {flattened_patches.shape}")
        if flattened_patches.shape[1] > cfg.max_patches:
            raise ValueError(f"{flattened_patches.shape[1]} patches exceed max_patches={cfg.max_patches}")
        if attention_mask is None:
            attention_mask = jnp.sum(flattened_patches.astype(jnp.float32), axis=-1) != 0
        elif attention_mask.shape != flattened_patches.shape[:2]:
            raise ValueError(f"attention_mask shape {attention_mask.shape} does not match the patches "
                             f"{flattened_patches.shape[:2]}")
        # Every patch (padding too) attends the real patches: query ids 1, key ids the mask (0 = padding).
        keys = attention_mask.astype(jnp.int32)
        segments = Segments(jnp.ones_like(keys), keys)
        num_run = layers_to_run(cfg.output_layer, cfg.num_layers, "output_layer")
        x = self.embed(flattened_patches)
        if num_run:
            x, _ = scan_layers(slice_stack(self.layers, 0, num_run), lambda layer, h, _: (layer(h, segments), None), x,
                               remat_policy=cfg.remat_policy)
        return self.final_norm(x) if cfg.output_layer == -1 else x
