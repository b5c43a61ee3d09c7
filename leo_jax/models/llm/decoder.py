"""Decoder-only LLM family: Llama 2 / Vicuna, Llama 3 (RoPE scaling), InternLM2 and Qwen2 (q/k/v bias).

One architecture (RMSNorm, RoPE, grouped-query attention, SwiGLU, optional tied embeddings) with the layers
stacked and run by `lax.scan` under a named remat policy. Masks come from segment ids, so left-padded batches,
packed rows and KV-cache decoding share one code path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from leo_jax.config import FrozenDict, dataclass_from_config, freeze, require
from leo_jax.layers.attention import Attention, KVCache, Segments, check_attention_impl
from leo_jax.layers.common import Embed, Linear, RMSNorm, check_numerics, scan_layers, stack_layers, to_dtype
from leo_jax.layers.mlp import SwiGLU
from leo_jax.layers.rope import check_rope_scaling, inverse_frequencies, rope_tables
from leo_jax.models.mmoe import MMoE, MMoEConfig, RoutingContext
from leo_jax.sharding import constrain

FAMILIES = ("llama", "qwen2", "internlm2")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Architecture and numerics of one decoder. `family` only selects the checkpoint layout on conversion."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    family: str = "llama"
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: FrozenDict | None = None  # Hugging Face's rope_scaling fields (a dict given is frozen)
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    out_bias: bool = False
    tie_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    # Attention kernel (leo_jax.layers.attention): xla | splash | cudnn | auto (splash on TPU, cudnn on GPU, else xla;
    # decoding with a KV cache always runs xla). splash_block: splash's q/kv block size (a multiple of 128).
    attention_impl: str = "auto"
    splash_block: int = 512
    mmoe: MMoEConfig | None = None  # LEO-MINI's LoRA experts + routers

    def __post_init__(self):
        object.__setattr__(self, "rope_scaling", freeze(self.rope_scaling))
        w = "config.model"
        require(self.family in FAMILIES, f"{w}.family={self.family!r}: use one of {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            require(getattr(self, name) > 0, f"{w}.{name} must be positive, got {getattr(self, name)}")
        require(self.num_heads % self.num_kv_heads == 0,
                f"{w}.num_heads={self.num_heads} must be a multiple of {w}.num_kv_heads={self.num_kv_heads}")
        require(self.head_dim is not None or self.hidden_size % self.num_heads == 0,
                f"{w}.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim")
        require(self.resolved_head_dim % 2 == 0, f"{w}.head_dim must be even for RoPE")
        check_numerics(self, w)
        check_attention_impl(self.attention_impl, self.splash_block, w)
        check_rope_scaling(self.rope_scaling, f"{w}.rope_scaling")

    @property
    def export_family(self) -> str:
        """The conversion family that writes this LLM (leo_jax.convert): its checkpoint layout."""
        return self.family

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.model") -> LLMConfig:
        return dataclass_from_config(cls, config, where)

    def forward_flops(self, seq_len: int) -> float:
        """Forward FLOPs for one sequence of `seq_len` tokens: 2 * T * (weights used in matmuls, incl. the output
        head, excl. the embedding gather) + causal attention scores and mixing, 2 * 2 * L * H * D * T^2 / 2."""
        h, d = self.hidden_size, self.resolved_head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * h * self.intermediate_size
        matmul = self.num_layers * (attn + mlp) + h * self.vocab_size
        return 2.0 * seq_len * matmul + 2.0 * self.num_layers * self.num_heads * d * seq_len**2

    def replace(self, **changes) -> LLMConfig:
        return dataclasses.replace(self, **changes)


class DecoderOutput(NamedTuple):
    """`out`: logits [B, T, vocab] (fp32) or final hidden states; `cache`: the updated cache or None; `aux`: MMoE
    router statistics stacked over layers (balance_loss [L], expert_load [L, E], router_entropy [L]) or {}."""

    out: jax.Array
    cache: DecoderCache | None
    aux: dict


class DecoderCache(NamedTuple):
    """KV cache for generation: per-layer keys/values stacked [L, B, S, K, D], key segment ids [B, S] (0 = empty
    or padding) and the next write index (a scalar shared by the batch; rows are left-padded)."""

    layers: KVCache
    segment_ids: jax.Array
    index: jax.Array


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, **kw)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                              qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, init_std=cfg.initializer_range,
                              attention_impl=cfg.attention_impl, splash_block=cfg.splash_block, rngs=rngs, **kw)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, **kw)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, init_std=cfg.initializer_range, rngs=rngs, **kw)
        mmoe = cfg.mmoe
        self.mmoe = None if mmoe is None else MMoE(
            cfg.hidden_size, mmoe, {**{n: getattr(self.attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                                    **{n: getattr(self.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")}},
            rngs=rngs, **kw)

    def __call__(self, x, *, segments, mask, rope, cache=None, cache_index=None, routing=None, token_mask=None):
        """Causal attention within `segments` (training / prefill without a cache) or with the dense cache `mask`."""
        h = self.input_norm(x)
        lora, stats = (None, {}) if self.mmoe is None else self.mmoe.adapter(h, routing, token_mask)
        h, cache = self.attn(h, segments=segments, causal=mask is None, mask=mask, rope=rope, cache=cache,
                             cache_index=cache_index, lora=lora)
        x = constrain(x + h, ("batch", "length", "act_embed"))
        x = x + self.mlp(self.post_attn_norm(x), lora=lora)
        return constrain(x, ("batch", "length", "act_embed")), cache, stats


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions restarting at 0 at the start of every segment (packed rows); 0 on padding (segment 0)."""
    idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return jnp.where(segment_ids == 0, 0, idx - start_idx).astype(jnp.int32)


def attention_mask(q_segments: jax.Array, k_segments: jax.Array, q_index: jax.Array, k_index: jax.Array):
    """[B, T, S]: causal by slot index, within the same segment, never onto empty/padding keys."""
    causal = k_index[None, None, :] <= q_index[None, :, None]
    same = q_segments[:, :, None] == k_segments[:, None, :]
    return causal & same & (k_segments[:, None, :] != 0)


class CausalLM(nnx.Module):
    """Token ids [B, T] -> logits [B, T, vocab] (fp32)."""

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, init_std=cfg.initializer_range, rngs=rngs, **kw)
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, **kw)
        self.lm_head = None if cfg.tie_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, in_axes=("embed",), out_axes=("vocab",),
            kernel_init=jax.nn.initializers.normal(cfg.initializer_range), rngs=rngs, **kw)

    def __call__(self, input_ids: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        return self.forward(self.embed(input_ids), segment_ids=segment_ids, positions=positions).out

    # The interface every trainable top-level model shares (CausalLM, LEO, LEO-MINI): see leo_jax.train.
    @property
    def language_model(self) -> CausalLM:
        return self

    def embed_inputs(self, batch: Mapping[str, jax.Array], *, rng: jax.Array | None = None,
                     deterministic: bool = True) -> tuple[jax.Array, RoutingContext | None]:
        """Input embeddings [B, T, E] for a data batch (text only here; LEO models write visual tokens in) and
        the MMoE routing context (None for a plain LLM)."""
        del rng, deterministic
        return self.embed(batch["input_ids"]), None

    def train_forward(self, batch: Mapping[str, jax.Array], *, rng: jax.Array | None = None,
                      deterministic: bool = True) -> DecoderOutput:
        """Logits and router statistics for a collated batch (input_ids, segment_ids, positions, ...)."""
        embeds, routing = self.embed_inputs(batch, rng=rng, deterministic=deterministic)
        return self.language_model.forward(embeds, segment_ids=batch.get("segment_ids"),
                                           positions=batch.get("positions"), routing=routing)

    def logits(self, hidden: jax.Array) -> jax.Array:
        out = self.embed.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return constrain(out.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def forward(self, embeds: jax.Array, *, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                cache: DecoderCache | None = None, return_hidden: bool = False,
                routing: RoutingContext | None = None) -> DecoderOutput:
        """Runs the stack on input embeddings [B, T, E] (LEO writes visual tokens into them first). `routing` is
        required when the config has MMoE experts."""
        cfg = self.cfg
        if (cfg.mmoe is None) != (routing is None):
            raise ValueError("config.model.mmoe and the `routing` argument go together: an LLM with MMoE experts "
                             "needs RoutingContext(visual, prompt); one without takes none")
        b, t = embeds.shape[:2]
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if positions is None:
            positions = positions_from_segments(segment_ids) if cache is None else \
                jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        q_index = start + jnp.arange(t, dtype=jnp.int32)
        if cache is None:
            k_segments, k_index = segment_ids, q_index
        else:
            k_segments = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids.astype(jnp.int32), start, 1)
            k_index = jnp.arange(k_segments.shape[1], dtype=jnp.int32)
        # Without a cache the kernel masks by segments (causal within equal ids); with one, a dense [B, T, S] mask.
        segments, mask = (Segments(segment_ids, segment_ids), None) if cache is None else \
            (None, attention_mask(segment_ids, k_segments, q_index, k_index))
        total_len = t if cache is None else k_segments.shape[1]
        inv_freq = inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling,
                                       cfg.max_position_embeddings, seq_len=total_len)
        rope = rope_tables(positions, inv_freq)
        x = constrain(embeds.astype(to_dtype(cfg.dtype)), ("batch", "length", "act_embed"))

        token_mask = segment_ids != 0

        def body(layer, h, layer_cache):
            h, new_cache, stats = layer(h, segments=segments, mask=mask, rope=rope, cache=layer_cache,
                                        cache_index=start, routing=routing, token_mask=token_mask)
            return h, (new_cache, stats)

        x, (new_layers, aux) = scan_layers(self.layers, body, x, None if cache is None else cache.layers,
                                           remat_policy=cfg.remat_policy)
        x = self.norm(x)
        new_cache = None if cache is None else DecoderCache(new_layers, k_segments, start + t)
        return DecoderOutput(x if return_hidden else self.logits(x), new_cache, aux)

    def init_cache(self, batch: int, max_len: int, dtype: Any | None = None) -> DecoderCache:
        cfg = self.cfg
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
        dtype = to_dtype(dtype or cfg.dtype)
        return DecoderCache(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),
                            jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))
