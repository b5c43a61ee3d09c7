"""MMoE: a mixture of LoRA experts in the LLM, routed by the text AND the image (LEO-MINI).

In every decoder layer, for each target projection W0 (frozen):
    y = W0 x + B_g A_g x + sum_{e in top-k} g_e B_e A_e x
with an always-on general LoRA (A_g, B_g) and E routed LoRAs. One router per layer, a 2-layer GELU MLP over
[h ; Linear(mean of the visual tokens) ; Linear(mean of the prompt-token embeddings)] where h is the layer's
normalised input hidden state (per token) -> softmax over E.

Points the published equations leave open, all configurable: which projections carry experts (default the MLP down
projection), the gate of a selected expert (its probability, or straight-through: forward 1, gradient of the
probability), and the balance loss (Switch style: E * sum_e f_e P_e over non-padding tokens, f = top-1 assignment
fraction, P = mean probability; the trainer weights it, default 0.05).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from leo_jax.config import dataclass_from_config, require
from leo_jax.layers.common import Linear
from leo_jax.layers.lora import LoRAExperts

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GATE_MODES = ("prob", "straight_through")


@dataclasses.dataclass(frozen=True)
class MMoEConfig:
    num_experts: int = 3  # routed LoRA experts E
    rank: int = 16
    alpha: float = 16.0
    general_rank: int = 16  # the always-on general LoRA (0 = none)
    general_alpha: float = 16.0
    top_k: int = 1
    targets: tuple[str, ...] = ("down_proj",)  # projections that carry experts (left open by the paper)
    router_hidden: int = 256
    router_cond_dim: int = 256  # width of Linear(mean visual) and Linear(mean prompt) in the router input
    gate_mode: str = "prob"  # 'prob': g_e = p_e; 'straight_through': forward 1, gradient via p_e
    renormalize: bool = False  # renormalise the top-k probabilities to sum to 1

    def __post_init__(self):
        w = "config.model.llm.mmoe"
        require(self.num_experts >= 1, f"{w}.num_experts must be >= 1")
        require(1 <= self.top_k <= self.num_experts, f"{w}.top_k={self.top_k} must be in [1, num_experts]")
        require(self.rank >= 1 and self.general_rank >= 0, f"{w}: rank must be >= 1 and general_rank >= 0")
        bad = [t for t in self.targets if t not in TARGETS]
        require(not bad and self.targets, f"{w}.targets={self.targets}: choose from {TARGETS}")
        require(self.gate_mode in GATE_MODES, f"{w}.gate_mode={self.gate_mode!r}: use one of {GATE_MODES}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.model.llm.mmoe") -> MMoEConfig:
        return dataclass_from_config(cls, config, where)


class RoutingContext(NamedTuple):
    """Per-sample conditioning for the routers: mean visual token and mean prompt embedding, each [B, T|1, d]
    (per token for packed rows)."""

    visual: jax.Array
    prompt: jax.Array


class Router(nnx.Module):
    def __init__(self, hidden: int, cfg: MMoEConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.visual_proj = Linear(hidden, cfg.router_cond_dim, in_axes=("embed",), out_axes=(None,), **kw)
        self.prompt_proj = Linear(hidden, cfg.router_cond_dim, in_axes=("embed",), out_axes=(None,), **kw)
        self.fc1 = Linear(hidden + 2 * cfg.router_cond_dim, cfg.router_hidden, in_axes=(None,), out_axes=(None,), **kw)
        self.fc2 = Linear(cfg.router_hidden, cfg.num_experts, in_axes=(None,), out_axes=("experts",), **kw)

    def __call__(self, h: jax.Array, ctx: RoutingContext) -> jax.Array:
        """Router probabilities [B, T, E] in fp32."""
        shape = h.shape[:2]
        visual = jnp.broadcast_to(self.visual_proj(ctx.visual), (*shape, self.visual_proj.out_features[0]))
        prompt = jnp.broadcast_to(self.prompt_proj(ctx.prompt), (*shape, self.prompt_proj.out_features[0]))
        features = jnp.concatenate([h.astype(visual.dtype), visual, prompt], axis=-1)
        logits = self.fc2(jax.nn.gelu(self.fc1(features), approximate=False))
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def routing_gates(probs: jax.Array, cfg: MMoEConfig) -> jax.Array:
    """Gates [B, T, E] of the top-k experts (0 elsewhere) from router probabilities."""
    _, top = jax.lax.top_k(probs, cfg.top_k)
    selected = jnp.sum(jax.nn.one_hot(top, cfg.num_experts, dtype=probs.dtype), axis=-2)
    if cfg.gate_mode == "straight_through":
        return selected + probs - jax.lax.stop_gradient(probs)
    gates = selected * probs
    if cfg.renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return gates


def routing_stats(probs: jax.Array, token_mask: jax.Array) -> dict[str, jax.Array]:
    """Switch balance loss E * sum_e f_e P_e, the expert load f [E] and the mean router entropy, over real tokens."""
    num_experts = probs.shape[-1]
    weights = token_mask.astype(jnp.float32)[..., None]
    count = jnp.maximum(jnp.sum(weights), 1.0)
    top1 = jax.nn.one_hot(jnp.argmax(probs, axis=-1), num_experts, dtype=jnp.float32)
    load = jnp.sum(top1 * weights, axis=(0, 1)) / count
    mean_prob = jnp.sum(probs * weights, axis=(0, 1)) / count
    entropy = -jnp.sum(jnp.sum(probs * jnp.log(probs + 1e-9), -1, keepdims=True) * weights) / count
    return {"balance_loss": num_experts * jnp.sum(load * mean_prob), "expert_load": load, "router_entropy": entropy}


class MMoE(nnx.Module):
    """Router plus, for every target projection, the general LoRA and the routed LoRA experts of one layer."""

    def __init__(self, hidden: int, cfg: MMoEConfig, projections: Mapping[str, Linear], *, dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.router = Router(hidden, cfg, **kw)
        self.experts = nnx.Dict({t: LoRAExperts(projections[t], cfg.num_experts, cfg.rank, cfg.alpha, **kw)
                                 for t in cfg.targets})
        self.general = nnx.Dict({t: LoRAExperts(projections[t], 1, cfg.general_rank, cfg.general_alpha, **kw)
                                 for t in cfg.targets}) if cfg.general_rank else None

    def adapter(self, h: jax.Array, ctx: RoutingContext, token_mask: jax.Array):
        """Routes once from the layer input `h` and returns (delta_fn(name, x) -> delta or None, statistics over
        the real tokens `token_mask` [B, T])."""
        probs = self.router(h, ctx)
        gates = routing_gates(probs, self.cfg)
        always_on = jnp.ones((*h.shape[:2], 1), jnp.float32)

        def delta(name: str, x: jax.Array):
            if name not in self.cfg.targets:
                return None
            out = self.experts[name](x, gates)
            if self.general is not None:
                out = out + self.general[name](x, always_on)
            return out

        return delta, routing_stats(probs, token_mask)
