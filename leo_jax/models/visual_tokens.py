"""Writing visual tokens into the text embeddings at the <IMG_CONTEXT> positions, with a loud count check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _raise_on_mismatch(context_counts: np.ndarray, visual_counts: np.ndarray, where: str) -> None:
    bad = np.nonzero(np.asarray(context_counts) != np.asarray(visual_counts))[0]
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"{where}: batch row {row} has {int(context_counts[row])} <IMG_CONTEXT> tokens but "
                         f"{int(visual_counts[row])} visual tokens ({bad.size} rows disagree); the prompt's image "
                         f"placeholders and the images/tiles in the batch must match (check the template's image "
                         f"token counts and the tile/image masks)")


def check_context_tokens(context: jax.Array, visual_mask: jax.Array, where: str) -> jax.Array:
    """Number of rows whose count of <IMG_CONTEXT> positions differs from their count of valid visual tokens.

    Eagerly a mismatch raises at once. Under jit no host callback runs inside the step (it can stall collectives on
    multi-device meshes): the models report the count in `aux['visual_token_mismatch']` and the trainer raises with
    the same message when it fetches the step's metrics."""
    context_counts = jnp.sum(context, axis=1)
    visual_counts = jnp.sum(visual_mask, axis=1)
    if not isinstance(context_counts, jax.core.Tracer) and not isinstance(visual_counts, jax.core.Tracer):
        _raise_on_mismatch(np.asarray(context_counts), np.asarray(visual_counts), where)
    return jnp.sum(context_counts != visual_counts).astype(jnp.int32)


def scatter_visual_tokens(embeds: jax.Array, context: jax.Array, visual: jax.Array) -> jax.Array:
    """embeds [B, T, D] with the k-th True position of `context` [B, T] replaced by visual[:, k] ([B, V, D]).

    Valid visual tokens must come first in `visual` (the data pipeline fills the first image/tile slots)."""
    index = jnp.clip(jnp.cumsum(context, axis=1) - 1, 0, visual.shape[1] - 1)
    gathered = jnp.take_along_axis(visual, index[..., None], axis=1)
    return jnp.where(context[..., None], gathered.astype(embeds.dtype), embeds)


def per_token_context(values: jax.Array, value_segments: jax.Array, token_segments: jax.Array) -> jax.Array:
    """For every token, the mean of the `values` [B, V, D] whose segment (value_segments [B, V], 0 = none) equals
    the token's segment (token_segments [B, T]); 0 where there is none. -> [B, T, D] (fp32)."""
    same = (token_segments[:, :, None] == value_segments[:, None, :]) & (value_segments[:, None, :] != 0)
    weights = same.astype(jnp.float32)
    total = jnp.einsum("btv,bvd->btd", weights, values.astype(jnp.float32))
    return total / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1.0)


def gather_slots(slots: jax.Array, index: jax.Array) -> jax.Array:
    """The items of a visual budget: `slots` [B, K, ...] (B rows in G contiguous groups) at `index` [G, n] (flat
    slot within the group, row * K + slot; -1 = unused, which reads the group's first slot) -> [G * n, ...].

    Each group gathers from its own rows only, so with the groups on the devices that hold those rows (the data
    pipeline's layout) the gather needs no communication."""
    groups, n = index.shape
    b, k = slots.shape[:2]
    grouped = slots.reshape(groups, (b // groups) * k, *slots.shape[2:])
    taken = jax.vmap(lambda x, i: jnp.take(x, i, axis=0))(grouped, jnp.maximum(index, 0))
    return taken.reshape(groups * n, *slots.shape[2:])


def scatter_slots(items: jax.Array, index: jax.Array, rows: int, slots: int) -> jax.Array:
    """Inverse of `gather_slots`: `items` [G * n, ...] back to [rows, slots, ...]; slots not in `index` are zero and
    unused entries (-1) are dropped."""
    groups, n = index.shape
    per_group = (rows // groups) * slots
    items = items.reshape(groups, n, *items.shape[1:])
    target = jnp.where(index < 0, per_group, index)  # out of range: dropped
    zeros = jnp.zeros((groups, per_group, *items.shape[2:]), items.dtype)
    placed = jax.vmap(lambda z, i, v: z.at[i].set(v, mode="drop"))(zeros, target, items)
    return placed.reshape(rows, slots, *items.shape[2:])
