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


def check_context_tokens(context: jax.Array, visual_mask: jax.Array, where: str) -> None:
    """Errors when a row's number of <IMG_CONTEXT> positions differs from its number of valid visual tokens.

    Eagerly it raises at once; under jit the check runs as a host callback and fails the step with the message."""
    context_counts = jnp.sum(context, axis=1)
    visual_counts = jnp.sum(visual_mask, axis=1)
    if isinstance(context_counts, jax.core.Tracer) or isinstance(visual_counts, jax.core.Tracer):
        jax.debug.callback(_raise_on_mismatch, context_counts, visual_counts, where)
    else:
        _raise_on_mismatch(np.asarray(context_counts), np.asarray(visual_counts), where)


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
