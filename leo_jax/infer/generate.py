"""Autoregressive generation with the KV cache: one prefill, then either a compiled decode loop (`lax.scan`, for
batch work) or a per-token decode step jitted once and driven from the host (streaming). Both run the same step
function on the same per-step random keys, so they produce the same tokens.

Entry points: `generate` (token ids of a plain LLM), `generate_from_batch` (a data-pipeline batch of any model:
LEO / LEO-MINI write their visual tokens into the prompt embeddings and condition the MMoE routers),
`stream_from_batch` (the same, yielding each step's tokens as they are produced) and `continuation_logprobs` (the
log-likelihood of given answers, for multiple-choice scoring).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leo_jax.models.llm.decoder import CausalLM, DecoderCache
from leo_jax.models.mmoe import RoutingContext
from leo_jax.sampling import SamplingConfig


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


def prompt_inputs(model: nnx.Module, batch: Mapping[str, jax.Array], lengths: jax.Array):
    """Left-padded prompt embeddings [B, T, D], segment ids [B, T], the routing context of new tokens [B, 1, d] and
    that of the prompt tokens [B, T, d] (None without MMoE), for a batch of one sample per row whose first
    `lengths[r]` tokens are row r's prompt (the rest is padding or the answer).

    The embeddings come from the model's `embed_inputs` on the whole row, exactly as in training (images written
    at the <IMG_CONTEXT> positions, CoTR conditioned on the prompt tokens only); then each row is shifted right so
    that all prompts end at the last column."""
    embeds, routing = model.embed_inputs(batch, deterministic=True)
    b, t = batch["input_ids"].shape
    shift = t - lengths  # row r's token j moves to column j + shift[r]
    source = jnp.arange(t)[None, :] - shift[:, None]
    valid = source >= 0
    aligned = jnp.take_along_axis(embeds, jnp.clip(source, 0, t - 1)[..., None], axis=1)
    aligned = jnp.where(valid[..., None], aligned, 0).astype(embeds.dtype)
    prefill_routing = None
    if routing is not None:
        # Prompt tokens keep their own per-token context, aligned like the embeddings (a multi-turn prompt's earlier
        # exchanges are conditioned as in training); new tokens continue the last exchange: its last token's context.
        prefill_routing = RoutingContext(*(jnp.where(valid[..., None], jnp.take_along_axis(
            x, jnp.clip(source, 0, t - 1)[..., None], axis=1), 0).astype(x.dtype) for x in routing))
        last = jnp.maximum(lengths - 1, 0)[:, None, None]
        routing = RoutingContext(*(jnp.take_along_axis(x, last, axis=1) for x in routing))
    return aligned, valid.astype(jnp.int32), routing, prefill_routing


class DecodeState(NamedTuple):
    """What one decode step carries: the last logits [B, V], the cache, each row's next position [B] and whether
    the row has stopped [B]."""

    logits: jax.Array
    cache: DecoderCache
    position: jax.Array
    done: jax.Array


def _prefill(model: CausalLM, embeds, segment_ids, routing, max_new_tokens: int) -> DecodeState:
    """routing: the prompt tokens' routing context ([B, T | 1, d]) or None."""
    b, t = segment_ids.shape
    cache = model.init_cache(b, t + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache, _ = model.forward(embeds, segment_ids=segment_ids, positions=positions, cache=cache,
                                     routing=routing)
    return DecodeState(logits[:, -1], cache, positions[:, -1] + 1, jnp.zeros((b,), bool))


def _step(model: CausalLM, state: DecodeState, step_rng, routing, sampling: SamplingConfig):
    """Samples one token per row (pad after a stop id) and runs it through the model: (next state, tokens [B])."""
    b = state.done.shape[0]
    token = sample_token(state.logits, step_rng, sampling.temperature, sampling.top_p)
    token = jnp.where(state.done, sampling.pad_id, token)
    done = state.done | jnp.isin(token, jnp.asarray(sampling.eos_ids or (-1,), jnp.int32))
    logits, cache, _ = model.forward(model.embed(token[:, None]), segment_ids=jnp.ones((b, 1), jnp.int32),
                                     positions=state.position[:, None], cache=state.cache, routing=routing)
    return DecodeState(logits[:, -1], cache, state.position + 1, done), token


@partial(jax.jit, static_argnames=("graphdef", "sampling"))
def _generate(graphdef, state, embeds, segment_ids, rng, routing, sampling: SamplingConfig, prefill_routing=None):
    """New tokens [B, max_new_tokens] of the language model (graphdef, state) for left-padded prompt embeddings;
    `routing` conditions new tokens, `prefill_routing` (default: `routing`) the prompt tokens."""
    model: CausalLM = nnx.merge(graphdef, state)
    init = _prefill(model, embeds, segment_ids, routing if prefill_routing is None else prefill_routing,
                    sampling.max_new_tokens)
    _, tokens = jax.lax.scan(lambda carry, key: _step(model, carry, key, routing, sampling), init,
                             jax.random.split(rng, sampling.max_new_tokens))
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


# --- from data-pipeline batches (any model kind) -----------------------------------------------------------------

@partial(jax.jit, static_argnames=("graphdef", "sampling"))
def _generate_batch(graphdef, states, batch, lengths, rng, sampling: SamplingConfig):
    model = nnx.merge(graphdef, *states)
    embeds, segments, routing, prefill_routing = prompt_inputs(model, batch, lengths)
    lm_graphdef, lm_state = nnx.split(model.language_model)
    return _generate(lm_graphdef, lm_state, embeds, segments, rng, routing, sampling, prefill_routing)


def generate_from_batch(graphdef: nnx.GraphDef, states: tuple, batch: Mapping[str, jax.Array], lengths,
                        sampling: SamplingConfig, rng: jax.Array | None = None) -> jax.Array:
    """New tokens [B, max_new_tokens] for a batch of one sample per row (the data pipeline's collated layout),
    row r's prompt being its first lengths[r] tokens. `states`: the model's state(s), as nnx.merge takes them
    (e.g. (trainable, frozen)). One compilation per (model structure, batch shapes, sampling)."""
    rng = jax.random.key(0) if rng is None else rng
    return _generate_batch(graphdef, tuple(states), dict(batch), jnp.asarray(lengths, jnp.int32), rng, sampling)


@partial(jax.jit, static_argnames=("graphdef",))
def _continuation_logprobs(graphdef, states, batch, lengths, continuation, continuation_mask):
    model = nnx.merge(graphdef, *states)
    embeds, segments, routing, prefill_routing = prompt_inputs(model, batch, lengths)
    lm = model.language_model
    c = continuation.shape[1]
    embeds = jnp.concatenate([embeds, lm.embed(continuation).astype(embeds.dtype)], axis=1)
    segments = jnp.concatenate([segments, continuation_mask], axis=1)
    if routing is not None:  # prompt tokens: their own context; continuation tokens: as generated tokens
        routing = RoutingContext(*(jnp.concatenate([p, jnp.repeat(r, c, axis=1)], axis=1)
                                   for p, r in zip(prefill_routing, routing)))
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0).astype(jnp.int32)
    logits = lm.forward(embeds, segment_ids=segments, positions=positions, routing=routing).out
    t = batch["input_ids"].shape[1]
    predicting = logits[:, t - 1:-1].astype(jnp.float32)  # the prompt's last column predicts the first new token
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(predicting, axis=-1), continuation[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(predicting, axis=-1) == continuation
    valid = continuation_mask.astype(bool)
    return jnp.where(valid, logprobs, 0).sum(axis=1), jnp.all(greedy | ~valid, axis=1)


def continuation_logprobs(graphdef: nnx.GraphDef, states: tuple, batch: Mapping[str, jax.Array], lengths,
                          continuation, continuation_mask) -> tuple[jax.Array, jax.Array]:
    """(log P(continuation | prompt) [B], whether greedy decoding yields the continuation [B]) for a batch laid out
    as for `generate_from_batch` and right-padded continuation ids [B, C] (mask 1 on tokens): one forward pass over
    the left-aligned prompt followed by the continuation, conditioned exactly as generation is."""
    return _continuation_logprobs(graphdef, tuple(states), dict(batch), jnp.asarray(lengths, jnp.int32),
                                  jnp.asarray(continuation, jnp.int32), jnp.asarray(continuation_mask, jnp.int32))


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _prefill_batch(graphdef, states, batch, lengths, max_new_tokens: int):
    model = nnx.merge(graphdef, *states)
    embeds, segments, routing, prefill_routing = prompt_inputs(model, batch, lengths)
    return _prefill(model.language_model, embeds, segments, prefill_routing, max_new_tokens), routing


@partial(jax.jit, static_argnames=("lm_graphdef", "sampling"), donate_argnames=("decode_state",))
def _decode_step(lm_graphdef, lm_state, decode_state: DecodeState, step_rng, routing, sampling: SamplingConfig):
    return _step(nnx.merge(lm_graphdef, lm_state), decode_state, step_rng, routing, sampling)


def stream_from_batch(graphdef: nnx.GraphDef, states: tuple, batch: Mapping[str, jax.Array], lengths,
                      sampling: SamplingConfig, rng: jax.Array | None = None) -> Iterator[np.ndarray]:
    """Like `generate_from_batch`, but yields each step's tokens [B] as soon as they are computed (one jitted
    prefill, then one jitted decode step per token, driven from the host); stops early once every row is done.
    Uses the same per-step keys as the compiled loop, so it yields the same tokens."""
    rng = jax.random.key(0) if rng is None else rng
    states = tuple(states)
    decode_state, routing = _prefill_batch(graphdef, states, dict(batch), jnp.asarray(lengths, jnp.int32),
                                           sampling.max_new_tokens)
    lm_graphdef, lm_state = nnx.split(nnx.merge(graphdef, *states).language_model)
    for key in jax.random.split(rng, sampling.max_new_tokens):
        decode_state, token = _decode_step(lm_graphdef, lm_state, decode_state, key, routing, sampling)
        yield np.asarray(token)
        if bool(decode_state.done.all()):
            return
