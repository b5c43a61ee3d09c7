"""Feed-forward blocks: SwiGLU (Llama family) and the two-layer GELU MLP (ViTs, projectors)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from leo_jax.layers.common import Linear, adapted
from leo_jax.sharding import constrain

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, features: int, hidden: int, *, dtype: Any, param_dtype: Any, init_std: float, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=jax.nn.initializers.normal(init_std), rngs=rngs)
        self.gate_proj = Linear(features, hidden, in_axes=("embed",), out_axes=("mlp",), **kw)
        self.up_proj = Linear(features, hidden, in_axes=("embed",), out_axes=("mlp",), **kw)
        self.down_proj = Linear(hidden, features, in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, x: jax.Array, lora=None) -> jax.Array:
        h = jax.nn.silu(adapted(self.gate_proj, "gate_proj", x, lora)) * adapted(self.up_proj, "up_proj", x, lora)
        h = constrain(h, ("batch", "length", "act_mlp"))
        return adapted(self.down_proj, "down_proj", h, lora)


class MLP(nnx.Module):
    """fc2(act(fc1(x))) with biases, as in ViT blocks."""

    def __init__(self, features: int, hidden: int, *, act: str = "gelu", use_bias: bool = True, dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs, out_features: int | None = None):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = activation(act)
        self.fc1 = Linear(features, hidden, in_axes=("embed",), out_axes=("mlp",), **kw)
        self.fc2 = Linear(hidden, out_features or features, in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))
