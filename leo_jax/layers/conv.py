"""Convolutions written as the operations every backend runs fast, with the numbers of `lax.conv_general_dilated`.

- `patch_conv`: a stride-p p x p convolution (ViT patch embeddings, ConvNeXt's stem and downsampling) is one matmul
  over flattened non-overlapping patches.
- `depthwise_conv`: ConvNeXt's 7x7 depthwise convolution. XLA:CPU runs grouped convolutions without a fast kernel
  and rewrites the depthwise weight gradient into a dense [k, k, C, C] convolution (measured on a [32, 16, 16, 32]
  map, 2 cores: forward 25 ms, forward + both gradients 65 ms, against 1.0 ms / 19 ms here). On CPU it is k^2 shifted
  multiply-adds with a custom gradient (the input gradient is the same sum over the flipped kernel; the kernel
  gradient is one batched matmul over channels whose diagonals are summed); on TPU and GPU it stays XLA's
  convolution (`target_platform`: an AOT compile for TPU on a CPU host keeps the native kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from leo_jax.layers.common import target_platform


def patch_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """NHWC x [B, H, W, C] conv kernel [p, p, C, D] at stride p, no padding -> [B, H//p, W//p, D]. As torch's
    convolution, pixels past the last whole patch are ignored."""
    b, h, w, c = x.shape
    p = kernel.shape[0]
    gh, gw = h // p, w // p
    patches = x[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c)
    return jnp.einsum("byixjc,ijcd->byxd", patches, kernel)


def _depthwise_xla(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _shifted_sum(x: jax.Array, taps: jax.Array, padding: int) -> jax.Array:
    """sum_{i,j} pad(x)[:, i:i+Ho, j:j+Wo, :] * taps[i, j]: a stride-1 depthwise correlation, taps [k, k, C]."""
    k = taps.shape[0]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho, wo = xp.shape[1] - k + 1, xp.shape[2] - k + 1
    out = xp[:, :ho, :wo] * taps[0, 0]
    for i in range(k):
        for j in range(k):
            if i or j:
                out = out + xp[:, i:i + ho, j:j + wo] * taps[i, j]
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_shifted(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    return _shifted_sum(x, kernel[:, :, 0], padding)


def _depthwise_shifted_fwd(x, kernel, padding):
    return _shifted_sum(x, kernel[:, :, 0], padding), (x, kernel)


def _depthwise_shifted_bwd(padding, residuals, g):
    x, kernel = residuals
    k = kernel.shape[0]
    dx = _shifted_sum(g, kernel[::-1, ::-1, 0], k - 1 - padding)
    # dk[i, j, c] = sum_{b,h,w} pad(x)[b, h+i, w+j, c] g[b, h, w, c]: channel-major, one batched matmul over the
    # k row-shifted slabs gives t[c, i, v, w] = sum_{b,h} pad(x)[b, h+i, v, c] g[b, h, w, c]; dk sums its diagonals.
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0))).transpose(3, 0, 1, 2)
    gc = g.transpose(3, 0, 1, 2)
    ho, wo = g.shape[1:3]
    slabs = jnp.stack([xp[:, :, i:i + ho] for i in range(k)], axis=1)
    t = jnp.einsum("cibhv,cbhw->civw", slabs, gc, preferred_element_type=jnp.float32)
    w = jnp.arange(wo)
    dk = jnp.stack([jnp.sum(t[:, :, w + j, w], axis=-1) for j in range(k)], axis=2)  # [C, k(i), k(j)]
    return dx, dk.transpose(1, 2, 0)[:, :, None, :].astype(kernel.dtype)


_depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """Stride-1 depthwise convolution of NHWC x [B, H, W, C] with kernel [k, k, 1, C] and `padding` on every side."""
    if target_platform() == "cpu":
        return _depthwise_shifted(x, kernel, padding)
    return _depthwise_xla(x, kernel, padding)
