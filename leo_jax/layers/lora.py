"""LoRA weights as their own variable type, so optimisers and freezing can select them with `nnx.OfType(LoRAParam)`."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from leo_jax.layers.common import LORA, Axes, Linear, to_dtype


class LoRAParam(nnx.Param):
    """A low-rank adapter weight (trainable while the base weights it adapts stay frozen)."""


def lora_param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: Axes, dtype: Any) -> LoRAParam:
    return LoRAParam(init(rngs.params(), shape, to_dtype(dtype)), axes=tuple(axes), role=LORA)


class LoRAExperts(nnx.Module):
    """`num_experts` rank-r adapters of one Linear (same in/out shapes and logical axes as the base), stacked:
    A [E, *in, r] (Kaiming-uniform like peft), B [E, r, *out] (zeros, so training starts from the base model).
    delta(x, gates) = sum_e gates[..., e] * (alpha / r) * x A_e B_e, computed without materialising per-expert
    outputs (the gates scale the rank-r activations)."""

    def __init__(self, base: Linear, num_experts: int, rank: int, alpha: float, *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        self.n_in = len(base.in_features)
        base_axes = base.kernel.get_metadata()["axes"]
        in_axes, out_axes = base_axes[:self.n_in], base_axes[self.n_in:]
        self.scale = alpha / rank
        self.dtype = to_dtype(dtype)
        fan_in = math.prod(base.in_features)
        bound = 1.0 / math.sqrt(fan_in)
        a_init = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)  # noqa: E731
        self.lora_a = lora_param(rngs, a_init, (num_experts, *base.in_features, rank),
                                 ("experts", *in_axes, "lora_rank"), param_dtype)
        self.lora_b = lora_param(rngs, jax.nn.initializers.zeros, (num_experts, rank, *base.out_features),
                                 ("experts", "lora_rank", *out_axes), param_dtype)

    def __call__(self, x: jax.Array, gates: jax.Array) -> jax.Array:
        """x [B, T, *in]; gates [B, T, E] (ones for an always-on adapter) -> delta [B, T, *out]."""
        x = x.astype(self.dtype)
        a = self.lora_a[...].astype(self.dtype)
        b = self.lora_b[...].astype(self.dtype)
        in_dims = tuple(range(2, 2 + self.n_in))
        low = jnp.einsum(x, (0, 1, *in_dims), a, (100, *in_dims, 101), (0, 1, 100, 101))  # [B, T, E, r]
        low = low * gates[..., None].astype(self.dtype) * self.scale
        out_dims = tuple(range(200, 200 + b.ndim - 2))
        return jnp.einsum(low, (0, 1, 100, 101), b, (100, 101, *out_dims), (0, 1, *out_dims))
