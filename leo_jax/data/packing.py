"""Pack tokenised samples into fixed-shape batch rows (first-fit), with segment ids and restarting positions.

A *sample* (the per-sample transform's output) is a dict of numpy arrays:
  input_ids int32 [L], loss_mask bool [L] (True on tokens that are predicted, i.e. answer tokens),
  prompt_mask bool [L], sample_index int, and per visual item arrays with a leading item axis
  (LEO: ``tiles`` [n, t, t, 3], ``sam_tiles`` [n, s, s, 3]; LEO-MINI: ``pixels_<expert>`` [m, H, W, 3], ...).

A *batch* is the collated dict of ``BatchLayout.collate``: every row holds one or
more samples back to back; the model builds its attention mask from ``segment_ids`` (same segment and causal,
:func:`attention_mask`), so packed samples never see each other, and ``labels`` are shifted within each segment
so no target crosses a sample boundary. Visual items of a row are concatenated in segment order, which is the
order their ``<IMG_CONTEXT>`` runs appear in the row. Text-only samples produce exactly the same shapes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Sample = Mapping[str, Any]

TOKEN_KEYS = ("input_ids", "loss_mask", "prompt_mask")


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Static shape of a batch.

    batch_size: rows B. seq_len: T, the row capacity in tokens (and the padded length unless ``seq_buckets``).
    visual_capacity: K, visual items (LEO tiles, LEO-MINI images) per row. visual_mask_key: name of the [B, K]
    validity mask ('tile_mask' / 'image_mask'). visual_specs: per visual key, the (shape, dtype) of ONE item.
    max_segments: samples per row (1 = no packing). seq_buckets: optional sorted padded lengths; a batch is padded
    to the smallest bucket >= its longest row (all rows of a batch share one bucket), which bounds the number of
    compiled shapes to len(seq_buckets).
    group_budget: visual items each group of rows may hold (-1: no budget, no ``visual_index``). With a budget the
    rows split into ``budget_groups`` groups, one per device block of the batch axis and micro-batch (see
    :meth:`group_of`), and the batch carries ``visual_index`` [groups, group_budget]: each group's real items as
    flat slots (row within the group * K + slot), -1 for unused entries, so the model runs its encoders on those
    items only and every device gathers from its own rows.
    budget_accum: the micro-batches (train.grad_accum_steps) each step splits its rows into.
    """

    batch_size: int
    seq_len: int
    visual_capacity: int
    visual_mask_key: str
    visual_specs: Mapping[str, tuple[tuple[int, ...], Any]]
    pad_id: int
    max_segments: int = 1
    seq_buckets: tuple[int, ...] = ()
    group_budget: int = -1
    budget_groups: int = 1
    budget_accum: int = 1

    def __post_init__(self):
        if self.batch_size < 1 or self.seq_len < 2 or self.max_segments < 1 or self.visual_capacity < 0:
            raise ValueError(f"invalid batch layout {self}")
        if self.group_budget != -1 and (self.group_budget < 1 or self.batch_size % self.budget_groups
                                        or self.budget_groups % self.budget_accum):
            raise ValueError(f"invalid visual budget in batch layout {self}: group_budget must be -1 or positive, "
                             "budget_groups must divide the rows and be a multiple of budget_accum")
        buckets = list(self.seq_buckets)
        if buckets and (buckets != sorted(set(buckets)) or buckets[-1] != self.seq_len):
            raise ValueError(
                f"seq_buckets must be increasing and end at seq_len={self.seq_len}, got {self.seq_buckets}"
            )

    @property
    def visual_segment_key(self) -> str:
        """'tile_segment_ids' / 'image_segment_ids': the segment (sample) owning each visual slot, 0 if empty."""
        return self.visual_mask_key.replace("_mask", "_segment_ids")

    @property
    def budgeted(self) -> bool:
        return self.group_budget > 0

    def group_of(self, row: int) -> tuple[int, int]:
        """(group, row within the group) of a batch row. Device block d (rows d*R .. d*R+R-1, R = rows per device)
        holds groups d*A .. d*A+A-1 (A = budget_accum); row r goes to group d*A + r % A at position (r % R) // A,
        which is where the train step's micro-batch r % A (rows i, i+A, ...) puts it: after splitting, every
        micro-batch's groups are contiguous blocks of its rows, one per device."""
        rows_per_device = self.batch_size * self.budget_accum // self.budget_groups
        device, within = divmod(row, rows_per_device)
        return device * self.budget_accum + row % self.budget_accum, within // self.budget_accum

    def padded_length(self, longest_row: int) -> int:
        """The length a batch whose longest row has ``longest_row`` tokens is padded to."""
        for bucket in self.seq_buckets:
            if bucket >= longest_row:
                return bucket
        return self.seq_len

    def pad_to(self, batch: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
        """The collated ``batch`` padded along the token axis to ``length`` (e.g. the bucket every process of a
        multi-host step agreed on, so all compile and run the same program)."""
        current = batch["input_ids"].shape[1]
        if length < current or length > self.seq_len:
            raise ValueError(f"cannot pad a batch of {current} tokens to {length} (seq_len {self.seq_len})")
        out = dict(batch)
        for key, fill in (("input_ids", self.pad_id), ("labels", self.pad_id), ("loss_mask", 0), ("segment_ids", 0),
                          ("positions", 0), ("prompt_mask", False)):
            out[key] = np.pad(batch[key], ((0, 0), (0, length - current)), constant_values=fill)
        return out

    def collate(self, rows: Sequence[Sequence[Sample]]) -> dict[str, np.ndarray]:
        """Build the batch from ``rows`` (lists of samples; fewer than batch_size rows leave empty padding rows)."""
        if len(rows) > self.batch_size:
            raise ValueError(f"{len(rows)} rows for a batch of {self.batch_size}")
        lengths = [sum(len(s["input_ids"]) for s in row) for row in rows]
        length = self.padded_length(max(lengths, default=0))
        shape = (self.batch_size, length)
        batch = {
            "input_ids": np.full(shape, self.pad_id, np.int32),
            "labels": np.full(shape, self.pad_id, np.int32),
            "loss_mask": np.zeros(shape, np.float32),
            "segment_ids": np.zeros(shape, np.int32),
            "positions": np.zeros(shape, np.int32),
            "prompt_mask": np.zeros(shape, np.bool_),
            "sample_index": np.full((self.batch_size, self.max_segments), -1, np.int64),
            self.visual_mask_key: np.zeros((self.batch_size, self.visual_capacity), np.bool_),
            self.visual_segment_key: np.zeros((self.batch_size, self.visual_capacity), np.int32),
        }
        for key, (item_shape, dtype) in self.visual_specs.items():
            batch[key] = np.zeros((self.batch_size, self.visual_capacity, *item_shape), dtype)
        if self.budgeted:
            batch["visual_index"] = np.full((self.budget_groups, self.group_budget), -1, np.int32)
            group_items = [0] * self.budget_groups
        for r, row in enumerate(rows):
            if lengths[r] > self.seq_len or len(row) > self.max_segments:
                raise ValueError(f"row {r} holds {lengths[r]} tokens in {len(row)} samples; layout {self}")
            token_offset, item_offset = 0, 0
            for segment, sample in enumerate(row):
                ids = sample["input_ids"]
                n = len(ids)
                span = slice(token_offset, token_offset + n)
                batch["input_ids"][r, span] = ids
                # Next-token targets inside the segment only; the segment's last token predicts nothing.
                batch["labels"][r, token_offset : token_offset + n - 1] = ids[1:]
                batch["loss_mask"][r, token_offset : token_offset + n - 1] = sample["loss_mask"][1:]
                batch["segment_ids"][r, span] = segment + 1
                batch["positions"][r, span] = np.arange(n, dtype=np.int32)
                batch["prompt_mask"][r, span] = sample["prompt_mask"]
                batch["sample_index"][r, segment] = sample["sample_index"]
                items = num_visual_items(sample, self.visual_specs)
                for key in self.visual_specs:
                    batch[key][r, item_offset : item_offset + items] = sample[key]
                batch[self.visual_mask_key][r, item_offset : item_offset + items] = True
                batch[self.visual_segment_key][r, item_offset : item_offset + items] = segment + 1
                token_offset += n
                item_offset += items
            if self.budgeted and item_offset:
                group, within = self.group_of(r)
                start = group_items[group]
                if start + item_offset > self.group_budget:
                    raise ValueError(f"row {r}: its {item_offset} visual items overflow group {group}'s budget of "
                                     f"{self.group_budget} (data.visual_budget); layout {self}")
                slots = within * self.visual_capacity + np.arange(item_offset)
                batch["visual_index"][group, start : start + item_offset] = slots
                group_items[group] = start + item_offset
        return batch


def num_visual_items(sample: Sample, visual_specs: Mapping[str, Any]) -> int:
    """Number of visual items (tiles / images) a sample carries (0 for text-only)."""
    counts = {len(sample[key]) for key in visual_specs}
    if len(counts) > 1:
        raise ValueError(f"visual arrays of sample {sample.get('sample_index')} disagree on item count: {counts}")
    return counts.pop() if counts else 0


class FirstFitBatch:
    """Accumulates samples into the rows of one batch, first fit: each sample goes to the first row with room.

    Room means: tokens + the sample's length <= seq_len, visual items + its items <= visual_capacity, the row's
    group keeps within the layout's visual budget, and fewer than max_segments samples. With max_segments=1 this is
    plain batching; a sample that no row has room for starts the next batch.
    """

    def __init__(self, layout: BatchLayout):
        self.layout = layout
        self.rows: list[list[Sample]] = [[] for _ in range(layout.batch_size)]
        self._tokens = [0] * layout.batch_size
        self._items = [0] * layout.batch_size
        self._group_items = [0] * layout.budget_groups

    def fits_alone(self, sample: Sample) -> bool:
        """Whether the sample fits an empty row at all (else it can never be batched)."""
        return (
            len(sample["input_ids"]) <= self.layout.seq_len
            and num_visual_items(sample, self.layout.visual_specs) <= self.layout.visual_capacity
            and (not self.layout.budgeted
                 or num_visual_items(sample, self.layout.visual_specs) <= self.layout.group_budget)
        )

    def add(self, sample: Sample) -> bool:
        """Place the sample in the first row with room; False if no row has room (the batch is then complete)."""
        n_tokens = len(sample["input_ids"])
        n_items = num_visual_items(sample, self.layout.visual_specs)
        for r, row in enumerate(self.rows):
            if (
                len(row) < self.layout.max_segments
                and self._tokens[r] + n_tokens <= self.layout.seq_len
                and self._items[r] + n_items <= self.layout.visual_capacity
                and self.group_room(r) >= n_items
            ):
                row.append(sample)
                self._tokens[r] += n_tokens
                self._items[r] += n_items
                if self.layout.budgeted:
                    self._group_items[self.layout.group_of(r)[0]] += n_items
                return True
        return False

    def group_room(self, row: int) -> int | float:
        """Visual items the budget still lets row `row`'s group take (unbounded without a budget)."""
        if not self.layout.budgeted:
            return float("inf")
        return self.layout.group_budget - self._group_items[self.layout.group_of(row)[0]]

    @property
    def is_full(self) -> bool:
        """Every row holds max_segments samples: no later sample can be added."""
        return all(len(row) == self.layout.max_segments for row in self.rows)

    @property
    def is_empty(self) -> bool:
        return not any(self.rows)

    def collate(self) -> dict[str, np.ndarray]:
        return self.layout.collate(self.rows)


def attention_mask(segment_ids: np.ndarray) -> np.ndarray:
    """Boolean [B, T, T] mask: query t may attend key s iff s <= t, same segment, and not padding.

    This is the mask the model must derive from ``segment_ids`` for packed rows.
    """
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    length = segment_ids.shape[-1]
    causal = np.tril(np.ones((length, length), np.bool_))
    return same_segment & causal[None] & (segment_ids[:, :, None] > 0)
