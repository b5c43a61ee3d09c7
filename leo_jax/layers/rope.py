"""Rotary position embeddings in Hugging Face's half-split ("rotate_half") convention, with Llama 3, linear and
dynamic-NTK frequency scaling."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def check_rope_scaling(scaling: Mapping[str, Any] | None, where: str = "rope_scaling") -> None:
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"{where}: rope type {kind!r} is not supported; use one of {ROPE_TYPES}")
    needed = {"linear": ("factor",), "dynamic": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    missing = [k for k in needed.get(kind, ()) if k not in scaling]
    if missing:
        raise ValueError(f"{where}: rope type {kind!r} needs fields {missing}")


def inverse_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None,
                        max_position_embeddings: int | None = None, seq_len: int | None = None) -> np.ndarray:
    """inv_freq [head_dim // 2] in float32 exactly as transformers' rope init functions compute it.

    `dynamic` (NTK) scaling only changes the frequencies once the (static) sequence length exceeds
    `max_position_embeddings`; below that it equals the default, as in transformers.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "dynamic" and seq_len is not None and max_position_embeddings and seq_len > max_position_embeddings:
        factor = float(scaling["factor"])
        theta = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    if kind == "linear":
        inv_freq = (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., T, head_dim] for integer positions [..., T], computed in fp32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, D] rotated with cos/sin [B, T, D] (half-split convention, no weight permutation)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
