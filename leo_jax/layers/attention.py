"""Multi-head / grouped-query attention with optional RoPE, additive bias, masks and a KV cache."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from leo_jax.layers.common import Linear, adapted
from leo_jax.layers.rope import apply_rope
from leo_jax.sharding import constrain

# Large finite negative (not -inf) so fully masked rows (padding queries) give finite outputs instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          bias: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale + bias, masked) v with grouped KV heads; logits and softmax in fp32.

    q [B, T, H, D]; k, v [B, S, K, D] with H % K == 0; mask [B|1, T, S] (True = attend); bias [B|1, H|1, T, S].
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kv_heads, groups, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        heads = (kv_heads, groups) if bias.shape[1] == h else (1, 1)
        logits = logits + bias.astype(jnp.float32).reshape(bias.shape[0], *heads, *bias.shape[-2:])
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, v.shape[-1])


class KVCache(NamedTuple):
    """Per-layer cache (stacked over layers by the decoder): keys/values [B, S, K, D]."""

    key: jax.Array
    value: jax.Array


class Attention(nnx.Module):
    """Projections q/k/v/o with kernels [embed, heads, head_dim]; GQA when kv_heads < heads."""

    def __init__(self, features: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qkv_bias: bool = False,
                 out_bias: bool = False, dtype: Any, param_dtype: Any, init_std: float = 0.02, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=jax.nn.initializers.normal(init_std), rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = Linear(features, (num_heads, head_dim), in_axes=("embed",), out_axes=("heads", "head_dim"),
                             use_bias=qkv_bias, **kw)
        self.k_proj = Linear(features, (num_kv_heads, head_dim), in_axes=("embed",),
                             out_axes=("kv_heads", "head_dim"), use_bias=qkv_bias, **kw)
        self.v_proj = Linear(features, (num_kv_heads, head_dim), in_axes=("embed",),
                             out_axes=("kv_heads", "head_dim"), use_bias=qkv_bias, **kw)
        self.o_proj = Linear((num_heads, head_dim), features, in_axes=("heads", "head_dim"), out_axes=("embed",),
                             use_bias=out_bias, **kw)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, rope: tuple[jax.Array, jax.Array] | None = None,
                 cache: KVCache | None = None, cache_index: jax.Array | None = None,
                 bias: jax.Array | None = None, lora=None) -> tuple[jax.Array, KVCache | None]:
        """x [B, T, E]. With `cache`, the new keys/values are written at `cache_index` and attention runs over the
        whole cache (the mask must then be [B, T, S_cache]). `lora(name, input)` may add an adapter delta to any
        projection (see leo_jax.models.mmoe)."""
        q = checkpoint_name(adapted(self.q_proj, "q_proj", x, lora), "query_proj")
        k = checkpoint_name(adapted(self.k_proj, "k_proj", x, lora), "key_proj")
        v = checkpoint_name(adapted(self.v_proj, "v_proj", x, lora), "value_proj")
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = constrain(q, ("batch", "length", "act_heads", None))
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache.key, k.astype(cache.key.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache.value, v.astype(cache.value.dtype), cache_index, axis=1)
            cache = KVCache(k, v)
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, bias=bias)
        out = checkpoint_name(out, "attn_out")
        return adapted(self.o_proj, "o_proj", out, lora), cache
