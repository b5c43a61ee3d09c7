"""Multi-head / grouped-query attention with optional RoPE, additive bias, masks and a KV cache, computed by one
of several kernels chosen by `attention_impl`:

- `xla`: softmax(q k^T) v written out, the full [T, S] logits in fp32 (any mask or bias).
- `splash`: Pallas TPU splash attention (flash-style, never holds [T, S]): causal or bidirectional, segment ids
  for packed rows and padding, GQA; run under `shard_map` over the mesh axes that 'batch' and 'heads' map to.
  Off TPU (no TPU mesh in context and a non-TPU default backend) it runs in Pallas interpret mode, automatically:
  slow, for tests on CPU.
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')` (GPU, bf16/fp16): causal flag, segment ids as
  a dense mask; anything it cannot do falls back to `xla` with a log line.
- `auto`: splash on TPU, cudnn on GPU, xla elsewhere. Decoding with a KV cache and attention with an additive bias
  (SAM's relative positions) always use xla.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from leo_jax.layers.common import Linear, adapted, target_platform
from leo_jax.layers.rope import apply_rope
from leo_jax.sharding import constrain, fit_spec_to_shape, logical_to_spec

log = logging.getLogger(__name__)

ATTENTION_IMPLS = ("xla", "splash", "cudnn", "auto")
SPLASH_LANES = 128  # splash block sizes must be multiples of the TPU lane width

# Large finite negative (not -inf) so fully masked rows (padding queries) give finite outputs instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          bias: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale + bias, masked) v with grouped KV heads; logits and softmax in fp32.

    q [B, T, H, D]; k, v [B, S, K, D] with H % K == 0; mask [B|1, T, S] (True = attend); bias [B|1, H|1, T, S].
    """
    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    groups = h // kv_heads
    scale = d ** -0.5 if scale is None else scale
    # Head-major once: each KV head's group of query heads is one [groups*T, D] x [D, S] matmul (measured on XLA:CPU:
    # -15 to -30% attention time against contracting the token-major layouts in place).
    qh = q.reshape(b, t, kv_heads, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, groups * t, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, kv_heads, groups, t, s) * scale
    if bias is not None:
        heads = (kv_heads, groups) if bias.shape[1] == h else (1, 1)
        logits = logits + bias.astype(jnp.float32).reshape(bias.shape[0], *heads, *bias.shape[-2:])
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv_heads, groups * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vh).reshape(b, kv_heads, groups, t, -1)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, v.shape[-1])


class Segments(NamedTuple):
    """Which keys each query may see: q [B, T] and kv [B, S] int ids; a query attends a key iff the ids are equal
    and the key's id is not 0 (0 = padding). Packed rows give each sample its own id; an encoder's key padding
    mask is q = 1 everywhere, kv = the mask."""

    q: jax.Array
    kv: jax.Array

    def dense(self) -> jax.Array:
        """[B, T, S] boolean mask."""
        return (self.q[:, :, None] == self.kv[:, None, :]) & (self.kv[:, None, :] != 0)


def _causal_mask(t: int, s: int) -> jax.Array:
    return jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]


def _dense_mask(segments: Segments | None, causal: bool, t: int, s: int) -> jax.Array | None:
    mask = None if segments is None else segments.dense()
    if causal:
        mask = _causal_mask(t, s)[None] if mask is None else mask & _causal_mask(t, s)[None]
    return mask


@functools.cache
def log_fallback(message: str) -> None:
    log.warning(message)


class XlaAttention:
    """softmax(q k^T) v with the [T, S] logits materialised (`dot_product_attention`)."""

    name = "xla"

    def __call__(self, q, k, v, *, segments: Segments | None, causal: bool, scale: float | None) -> jax.Array:
        return dot_product_attention(q, k, v, mask=_dense_mask(segments, causal, q.shape[1], k.shape[1]),
                                     scale=scale)


@dataclasses.dataclass(frozen=True)
class SplashAttention:
    """Pallas splash attention. The length is padded to whole blocks inside (the pad gets segment id 0, which no
    real query attends); `block` (a multiple of 128) is used for every forward and backward block, capped at the
    padded length. Queries whose segment id is 0 (padding rows) attend the other padding keys instead of nothing:
    their outputs differ from xla's and must be masked by the consumer (the loss does); so do the queries of a row
    whose keys are all padding. On TPU with bf16 inputs,
    leave `jax_default_matmul_precision` at its default: Mosaic rejects fp32 contraction on bf16 operands."""

    block: int = 512
    name = "splash"

    def __call__(self, q, k, v, *, segments: Segments | None, causal: bool, scale: float | None) -> jax.Array:
        b, t, h, d = q.shape
        s = k.shape[1]
        if causal and s != t:
            raise ValueError(f"splash attention: causal attention needs as many keys as queries, got {t} and {s}")
        step = min(self.block, _round_up(max(t, s), SPLASH_LANES))
        tp, sp = _round_up(t, step), _round_up(s, step)
        if segments is None and (tp, sp) != (t, s):
            segments = Segments(jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32))
        if segments is not None:
            seg_q, seg_kv = segments.q.astype(jnp.int32), segments.kv.astype(jnp.int32)
            if not causal:  # a row with only padding keys (an empty image slot) would leave every query without a
                # key, and the kernel's softmax would divide by zero: its queries attend the padding instead
                seg_q = jnp.where(jnp.all(seg_kv == 0, axis=1, keepdims=True), 0, seg_q)
            segments = Segments(_pad_len(seg_q, tp), _pad_len(seg_kv, sp))
        q = _pad_len(q * jnp.asarray(d ** -0.5 if scale is None else scale, q.dtype), tp)
        k, v = _pad_len(k, sp), _pad_len(v, sp)
        kernel = _splash_kernel(tp, sp, h, causal, step, target_platform() != "tpu")

        def attend(q, k, v, seg_q, seg_kv):
            # [B, T, H, D] -> per example [H, T, D]; the kernel maps query head i to key head i // (H / K).
            qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
            if seg_q is None:
                out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1))(qt, kt, vt)
            else:
                from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
                out = jax.vmap(lambda q1, k1, v1, sq, skv: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(sq, skv)))(
                    qt, kt, vt, seg_q, seg_kv)
            return jnp.swapaxes(out, 1, 2)

        seg_args = (None, None) if segments is None else tuple(segments)
        out = _shard_over_batch_and_heads(attend, q, k, v, *seg_args)
        return out[:, :t]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_len(x: jax.Array, length: int) -> jax.Array:
    """Zero-pads axis 1 to `length`."""
    pad = length - x.shape[1]
    return x if pad == 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _splash_kernel(t: int, s: int, heads: int, causal: bool, block: int, interpret: bool):
    """The splash kernel for one example ([H, T, D] queries, [K, S, D] keys). Built at each trace (its block tables
    become constants of that trace), as the mask preprocessing on the host is cheap next to compilation."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    one = masks.CausalMask((t, s)) if causal else masks.FullMask((t, s))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(masks.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _shard_over_batch_and_heads(fn, q, k, v, seg_q, seg_kv):
    """Runs fn(q, k, v, seg_q, seg_kv) per shard under `shard_map` over the ambient mesh's axes for the logical
    'batch' and 'act_heads' / 'act_kv_heads' axes (straight call without a multi-device mesh). Heads are split only
    when both query and key heads divide over those axes, so each shard keeps whole GQA groups."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return fn(q, k, v, seg_q, seg_kv)
    batch = fit_spec_to_shape(logical_to_spec(("batch",)), q.shape[:1], mesh)[0]
    heads_q = fit_spec_to_shape(logical_to_spec((None, None, "act_heads")), q.shape[:3], mesh)[2]
    heads_kv = fit_spec_to_shape(logical_to_spec((None, None, "act_kv_heads")), k.shape[:3], mesh)[2]
    heads = heads_q if heads_q == heads_kv else None
    qkv_spec = jax.sharding.PartitionSpec(batch, None, heads, None)
    seg_spec = jax.sharding.PartitionSpec(batch, None)
    if seg_q is None:
        mapped = jax.shard_map(lambda q, k, v: fn(q, k, v, None, None), mesh=mesh,
                               in_specs=(qkv_spec,) * 3, out_specs=qkv_spec, check_vma=False)
        return mapped(q, k, v)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,) * 2, out_specs=qkv_spec,
                           check_vma=False)
    return mapped(q, k, v, seg_q, seg_kv)


class CudnnAttention:
    """`jax.nn.dot_product_attention(implementation='cudnn')`: the causal flag natively, segment ids as a dense
    [B, 1, T, S] mask (cuDNN folds it into a bias). cuDNN needs bf16/fp16 and a head dim <= 128 that is a multiple
    of 8; other cases run on xla (logged once)."""

    name = "cudnn"

    def __call__(self, q, k, v, *, segments: Segments | None, causal: bool, scale: float | None) -> jax.Array:
        d = q.shape[-1]
        if q.dtype not in (jnp.bfloat16, jnp.float16) or d > 128 or d % 8:
            log_fallback(f"attention_impl=cudnn: cuDNN needs bf16/fp16 and head_dim <= 128 (a multiple of 8); "
                      f"got {q.dtype} and {d}: using xla")
            return XlaAttention()(q, k, v, segments=segments, causal=causal, scale=scale)
        mask = None if segments is None else segments.dense()[:, None]
        return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=scale,
                                            is_causal=causal, implementation="cudnn")


def check_attention_impl(impl: str, block: int, where: str) -> None:
    """Config validation of `attention_impl` and `splash_block`, naming the fields."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"{where}.attention_impl={impl!r}: use one of {ATTENTION_IMPLS}")
    if block <= 0 or block % SPLASH_LANES:
        raise ValueError(f"{where}.splash_block={block}: use a positive multiple of {SPLASH_LANES}")


def attention_kernel(impl: str = "xla", splash_block: int = 512):
    """The kernel object for `attention_impl` on the current backend ('auto': splash on TPU, cudnn on GPU, else
    xla). Called at trace time, with the platform from `target_platform`."""
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "cudnn"}.get(target_platform(), "xla")
    if impl == "splash":
        return SplashAttention(splash_block)
    if impl == "cudnn":
        return CudnnAttention()
    if impl == "xla":
        return XlaAttention()
    raise ValueError(f"attention_impl={impl!r}: use one of {ATTENTION_IMPLS}")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla", splash_block: int = 512,
           segments: Segments | None = None, causal: bool = False, scale: float | None = None) -> jax.Array:
    """Attention of q [B, T, H, D] over k, v [B, S, K, D] with the kernel `impl`; `segments` and `causal` say
    which keys each query sees (None / False: all)."""
    return attention_kernel(impl, splash_block)(q, k, v, segments=segments, causal=causal, scale=scale)


class KVCache(NamedTuple):
    """Per-layer cache (stacked over layers by the decoder): keys/values [B, S, K, D]."""

    key: jax.Array
    value: jax.Array


class Attention(nnx.Module):
    """Projections q/k/v/o with kernels [embed, heads, head_dim]; GQA when kv_heads < heads."""

    def __init__(self, features: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qkv_bias: bool = False,
                 out_bias: bool = False, dtype: Any, param_dtype: Any, init_std: float = 0.02,
                 attention_impl: str = "xla", splash_block: int = 512, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=jax.nn.initializers.normal(init_std), rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.attention_impl, self.splash_block = attention_impl, splash_block
        self.q_proj = Linear(features, (num_heads, head_dim), in_axes=("embed",), out_axes=("heads", "head_dim"),
                             use_bias=qkv_bias, **kw)
        self.k_proj = Linear(features, (num_kv_heads, head_dim), in_axes=("embed",),
                             out_axes=("kv_heads", "head_dim"), use_bias=qkv_bias, **kw)
        self.v_proj = Linear(features, (num_kv_heads, head_dim), in_axes=("embed",),
                             out_axes=("kv_heads", "head_dim"), use_bias=qkv_bias, **kw)
        self.o_proj = Linear((num_heads, head_dim), features, in_axes=("heads", "head_dim"), out_axes=("embed",),
                             use_bias=out_bias, **kw)

    def __call__(self, x: jax.Array, *, segments: Segments | None = None, causal: bool = False,
                 mask: jax.Array | None = None, rope: tuple[jax.Array, jax.Array] | None = None,
                 cache: KVCache | None = None, cache_index: jax.Array | None = None,
                 bias: jax.Array | None = None, lora=None) -> tuple[jax.Array, KVCache | None]:
        """x [B, T, E]; `segments` / `causal` say which keys each query sees (see `Segments`), computed by the
        `attention_impl` kernel. With `cache`, the new keys/values are written at `cache_index` and attention runs
        over the whole cache on xla with the dense `mask` [B, T, S_cache] (as it does with an additive `bias`).
        `lora(name, input)` may add an adapter delta to any projection (see leo_jax.models.mmoe)."""
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
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if cache is not None or mask is not None or bias is not None:
            if segments is not None or causal:
                raise ValueError("Attention: pass either a dense mask/bias (xla) or segments/causal, not both")
            out = dot_product_attention(q, k, v, mask=mask, bias=bias)
        else:
            out = attend(q, k, v, impl=self.attention_impl, splash_block=self.splash_block, segments=segments,
                         causal=causal)
        out = checkpoint_name(out, "attn_out")
        return adapted(self.o_proj, "o_proj", out, lora), cache
