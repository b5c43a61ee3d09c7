"""Autoregressive generation with the KV cache: one prefill, then a compiled decode loop (greedy or sampled)."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leo_jax.models.llm.decoder import CausalLM


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_p < 1 keeps the smallest set of tokens whose probability reaches top_p."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token per row from logits [B, V]: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep tokens while the mass *before* them is < top_p (so at least the top token is kept)
        keep = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: list[list[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists into ids [B, T] and segment ids [B, T] (1 = token, 0 = padding)."""
    length = length or max(len(p) for p in prompts)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if any(len(p) > length for p in prompts):
        raise ValueError(f"a prompt is longer than the padded length {length}")
    ids = np.full((len(prompts), length), pad_id, np.int32)
    seg = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = p
        seg[i, length - len(p):] = 1
    return ids, seg


@partial(jax.jit, static_argnames=("graphdef", "sampling"))
def _generate(graphdef, state, embeds, segment_ids, rng, routing, sampling: SamplingConfig):
    model: CausalLM = nnx.merge(graphdef, state)
    b, t = segment_ids.shape
    cache = model.init_cache(b, t + sampling.max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache, _ = model.forward(embeds, segment_ids=segment_ids, positions=positions, cache=cache,
                                     routing=routing)
    eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)

    def step(carry, step_rng):
        logits_last, cache, position, done = carry
        token = sample_token(logits_last, step_rng, sampling.temperature, sampling.top_p)
        token = jnp.where(done, sampling.pad_id, token)
        done = done | jnp.isin(token, eos)
        next_logits, cache, _ = model.forward(model.embed(token[:, None]), segment_ids=jnp.ones((b, 1), jnp.int32),
                                              positions=position[:, None], cache=cache, routing=routing)
        return (next_logits[:, -1], cache, position + 1, done), token

    init = (logits[:, -1], cache, positions[:, -1] + 1, jnp.zeros((b,), bool))
    _, tokens = jax.lax.scan(step, init, jax.random.split(rng, sampling.max_new_tokens))
    return tokens.T


def generate(model: CausalLM, input_ids: np.ndarray, segment_ids: np.ndarray | None = None,
             sampling: SamplingConfig = SamplingConfig(), rng: jax.Array | None = None,
             embeds: jax.Array | None = None, routing=None) -> np.ndarray:
    """New tokens [B, max_new_tokens] for left-padded prompts (segment ids 1 on tokens, 0 on padding).

    After a row emits an EOS id it emits `pad_id`. `embeds` replaces the token embeddings of the prompt (LEO
    writes its visual tokens into them); `routing` conditions MMoE routers (LEO-MINI)."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    segment_ids = jnp.ones_like(input_ids) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    graphdef, state = nnx.split(model)
    embeds = model.embed(input_ids) if embeds is None else embeds
    rng = jax.random.key(0) if rng is None else rng
    return np.asarray(_generate(graphdef, state, embeds, segment_ids, rng, routing, sampling))
