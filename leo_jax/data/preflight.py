"""Pre-flight checks on the first batches of a run: fail loudly before hours of useless training.

Catches what otherwise trains silently wrong: batches with nothing supervised, `<IMG_CONTEXT>` runs
that disagree with the images/tiles the batch carries (the model would scatter visual tokens into the
wrong places or crash deep inside jit), template tokens the tokenizer would split into pieces, and
token ids beyond the model's embedding table.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable

import numpy as np

from leo_jax.data import templates
from leo_jax.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def _context_runs(row: np.ndarray, context_id: int) -> np.ndarray:
    """Lengths of the maximal runs of `context_id` in a 1-D id array."""
    is_context = np.concatenate([[0], (row == context_id).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(is_context))
    return edges[1::2] - edges[0::2]


def _expected_visual_tokens(batch: dict, index: int, tokens_per_tile: int | None, tokens_per_image: int | None):
    """(per-row expected IMG_CONTEXT count, tokens per visual unit, unit name) from the batch's masks."""
    if "tile_mask" in batch:
        if tokens_per_tile is None:
            raise ValueError(f"batch {index} has 'tile_mask' (LEO tiles) but check_batches got no tokens_per_tile; "
                             "pass the model's visual tokens per tile (512 for LEO)")
        return np.asarray(batch["tile_mask"]).astype(bool).sum(-1) * tokens_per_tile, tokens_per_tile, "tile"
    if "image_mask" in batch:
        if tokens_per_image is None:
            raise ValueError(f"batch {index} has 'image_mask' (LEO-MINI images) but check_batches got no "
                             "tokens_per_image; pass the model's visual tokens per image (CoTR queries, e.g. 64)")
        return np.asarray(batch["image_mask"]).astype(bool).sum(-1) * tokens_per_image, tokens_per_image, "image"
    return np.zeros(np.asarray(batch["input_ids"]).shape[0], np.int64), None, None


def check_batches(batches: Iterable[dict], tokenizer: Tokenizer, template: str, *,
                  tokens_per_tile: int | None = None, tokens_per_image: int | None = None,
                  vocab_size: int | None = None, max_batches: int | None = None) -> dict:
    """Checks collated batches (the data contract's dict of numpy arrays); raises ValueError on the first
    problem, naming it and the fix. Returns a summary (counts) and logs it.

    tokens_per_tile: visual tokens per LEO tile (batches with 'tile_mask').
    tokens_per_image: visual tokens per LEO-MINI image (batches with 'image_mask').
    vocab_size: rows of the model's embedding table; every id must be below it.
    max_batches: stop after this many batches (the iterable may be endless).
    """
    template = templates.get_template(template)
    uses_images = tokens_per_tile is not None or tokens_per_image is not None
    missing = templates.missing_special_tokens(tokenizer, template, with_images=uses_images)
    if missing:
        raise ValueError(templates.missing_tokens_message(missing, tokenizer, template))
    if vocab_size is not None:
        required = templates.required_special_tokens(tokenizer, template, with_images=uses_images)
        too_large = {t: tokenizer.token_to_id(t) for t in required if tokenizer.token_to_id(t) >= vocab_size}
        if too_large:
            raise ValueError(f"special tokens {too_large} have ids >= the model's vocab_size {vocab_size}; "
                             f"set the model's vocab_size to at least tokenizer.vocab_size ({tokenizer.vocab_size})")
    context_id = tokenizer.token_to_id(templates.IMG_CONTEXT) if uses_images else None
    start_id, end_id = (tokenizer.token_to_id(t) for t in (templates.IMG_START, templates.IMG_END)) \
        if uses_images else (None, None)

    summary = {"batches": 0, "rows": 0, "tokens": 0, "supervised_tokens": 0, "visual_tokens": 0,
               "rows_without_supervision": 0}
    for index, batch in enumerate(itertools.islice(batches, max_batches)):
        input_ids = np.asarray(batch["input_ids"])
        loss_mask = np.asarray(batch["loss_mask"]) > 0
        segment_ids = np.asarray(batch["segment_ids"]) if "segment_ids" in batch else np.ones_like(input_ids)
        if loss_mask.shape != input_ids.shape:
            raise ValueError(f"batch {index}: loss_mask shape {loss_mask.shape} != input_ids shape {input_ids.shape}")
        if not loss_mask.any():
            raise ValueError(f"batch {index} has no supervised tokens (loss_mask is all zero): answers were "
                             f"truncated by the maximum sequence length, the data has no gpt turns, or the template "
                             f"({template.name!r}) does not match the data; check max length and template")
        if vocab_size is not None and input_ids.max() >= vocab_size:
            raise ValueError(f"batch {index} holds token id {int(input_ids.max())} >= the model's vocab_size "
                             f"{vocab_size}; the tokenizer ({tokenizer.vocab_size} ids) and model disagree")
        if uses_images:
            expected, per_unit, unit = _expected_visual_tokens(batch, index, tokens_per_tile, tokens_per_image)
            actual = (input_ids == context_id).sum(-1)
            bad_rows = np.flatnonzero(actual != expected)
            if bad_rows.size:
                row = bad_rows[0]
                raise ValueError(
                    f"batch {index} row {row}: {int(actual[row])} {templates.IMG_CONTEXT} tokens but the row's "
                    f"{unit or 'image'} mask implies {int(expected[row])} visual tokens ({per_unit} per {unit}); "
                    f"make the encoder's tokens per {unit} and the data pipeline's image_token_counts agree, and "
                    f"drop samples whose image tokens are cut by the maximum sequence length")
            for row in range(input_ids.shape[0]):
                runs = _context_runs(input_ids[row], context_id)
                starts = int((input_ids[row] == start_id).sum())
                ends = int((input_ids[row] == end_id).sum())
                if starts != len(runs) or ends != len(runs) or (per_unit and np.any(runs % per_unit)):
                    raise ValueError(
                        f"batch {index} row {row}: image token layout is broken ({starts} {templates.IMG_START}, "
                        f"{ends} {templates.IMG_END}, {templates.IMG_CONTEXT} runs {runs.tolist()}, expected "
                        f"runs of a multiple of {per_unit}); every image must be encoded as IMG_START + "
                        f"n x IMG_CONTEXT + IMG_END by templates.encode_conversation, and never truncated")
            summary["visual_tokens"] += int(actual.sum())
        real_rows = (segment_ids > 0).any(-1)
        summary["rows_without_supervision"] += int((real_rows & ~loss_mask.any(-1)).sum())
        summary["batches"] += 1
        summary["rows"] += int(real_rows.sum())
        summary["tokens"] += int((segment_ids > 0).sum())
        summary["supervised_tokens"] += int(loss_mask.sum())
    if summary["batches"] == 0:
        raise ValueError("check_batches got no batches: the data pipeline produced nothing (empty data set or "
                         "every sample filtered out)")
    if summary["rows_without_supervision"]:
        logger.warning("preflight: %d row(s) have tokens but no supervised token", summary["rows_without_supervision"])
    logger.info("preflight ok: %s", summary)
    return summary
