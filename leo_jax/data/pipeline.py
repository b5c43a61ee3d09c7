"""Grain input pipeline: LLaVA-style records -> decoded, tiled, tokenised samples -> packed fixed-shape batches.

Stages (train)::

    source -> shuffle(seed) -> repeat(epochs) -> [this process's rows of each global batch]   (MapDataset, index
                                                                                               arithmetic only)
           -> SampleTransform (decode, LEO tiling / LEO-MINI expert preprocessing, tokenise)   (map_with_index)
           -> to_iter_dataset -> mp_prefetch(num_workers)                      (workers do the heavy part)
           -> PackedBatchDataset: drop + count skipped samples, first-fit rows, collate   (main process)

Why this split: every many-to-one step (skipping bad samples, packing, batching) runs *after* the worker
processes, which return exactly one element (a sample or a skip marker) per index in order, so the batch sequence
does not depend on the number of workers. Per-sample randomness (JPEG quality) is seeded by (seed, stream index),
so it does not depend on workers or on resuming either. The iterator state is Grain's state of the sample stream
plus the skip counters, all JSON-serialisable; a restored iterator yields exactly the next batch.

Global order: the shuffle and the epochs run over the global record list, and global batch b holds stream positions
b*G .. b*G+G-1 (G = data.global_batch_size); process p of n reads only positions b*G + p*G/n .. b*G + (p+1)*G/n - 1,
the rows its devices hold (`to_global_batch`). Without packing a record that is skipped leaves its row empty rather
than pulling in the next record, so the rows of global batch b depend on the seed, the epoch and b only, never on
the number of processes: a run resumes on another process count from the global batch index alone
(`make_train_iterator(start_batch=b)`). With packing each process packs its own rows first-fit, so the batches
depend on the process count, and resume needs the same count.

Public entry points: :func:`make_train_iterator`, :func:`make_eval_iterator`, :func:`to_global_batch`.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import io
import logging
import math
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
from etils import epath
from PIL import Image

from leo_jax.data import packing, sources, templates
from leo_jax.data.visual import VisualKind, VisualSetup

logger = logging.getLogger(__name__)

# Skip reasons (besides the sources' malformed_json / malformed_record).
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TAG_MISMATCH = "image_tag_mismatch"
TOO_LONG = "too_long"
TOO_MANY_IMAGES = "too_many_images"
NO_SUPERVISED_TOKENS = "no_supervised_tokens"
OVER_VISUAL_BUDGET = "over_visual_budget"
BAD_CONVERSATION = "bad_conversation"

IMAGE_TAG = templates.IMAGE_PLACEHOLDER
SKIP_KEY = "skip_reason"


class DataSkipLimitError(RuntimeError):
    """Too large a fraction of the input was unusable: most likely a wrong path, image root or template."""


class SkipStats:
    """Counts of seen and skipped records per reason; raises once the skip fraction passes the limit, over all
    records so far or over the last ``window`` records (a bad shard late in a long run).

    ``as_metrics()`` gives flat numbers for the trainer's logs; ``state()``/``load()`` travel in the iterator state.
    """

    def __init__(self, max_skip_fraction: float, min_records_checked: int, window: int = 0,
                 max_window_skip_fraction: float = 1.0):
        for name, value in (("max_skip_fraction", max_skip_fraction),
                            ("max_window_skip_fraction", max_window_skip_fraction)):
            if not 0 <= value <= 1:
                raise ValueError(f"data.{name} must be in [0, 1], got {value}")
        if window < 0:
            raise ValueError(f"data.skip_window must be >= 0 (0 = no windowed limit), got {window}")
        self.max_skip_fraction = max_skip_fraction
        self.min_records_checked = min_records_checked
        self.max_window_skip_fraction = max_window_skip_fraction
        self.seen = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.recent: collections.deque[int] = collections.deque(maxlen=window or None)  # 1 = skipped
        self.window = window

    def _record(self, skipped: bool) -> None:
        self.seen += 1
        if self.window:
            self.recent.append(int(skipped))

    def record_ok(self) -> None:
        self._record(False)

    def record_skip(self, reason: str, origin: str, detail: str) -> None:
        self._record(True)
        self.skipped[reason] += 1
        logger.warning("data: skipped %s (%s: %s)", origin, reason, detail)
        recent = sum(self.recent)
        if self.window and len(self.recent) == self.window and recent > self.max_window_skip_fraction * self.window:
            raise DataSkipLimitError(
                f"skipped {recent} of the last {self.window} records ({recent / self.window:.1%} > "
                f"max_window_skip_fraction={self.max_window_skip_fraction:.1%}; {sum(self.skipped.values())} of "
                f"{self.seen} in all); by reason: {dict(self.skipped)}; last: {origin} ({reason}: {detail}). "
                "A bad file or shard? Check it, or raise data.max_window_skip_fraction / data.skip_window."
            )
        total = sum(self.skipped.values())
        if self.seen >= self.min_records_checked and total > self.max_skip_fraction * self.seen:
            raise DataSkipLimitError(
                f"skipped {total} of {self.seen} records ({total / self.seen:.1%} > max_skip_fraction="
                f"{self.max_skip_fraction:.1%}); by reason: {dict(self.skipped)}; last: {origin} ({reason}: {detail}). "
                "Check data.train_files, data.image_root and data.template, or raise data.max_skip_fraction."
            )

    def as_metrics(self) -> dict[str, int]:
        metrics = {"data/records_seen": self.seen, "data/records_skipped": sum(self.skipped.values())}
        metrics.update({f"data/skipped/{reason}": n for reason, n in sorted(self.skipped.items())})
        return metrics

    def window_metrics(self) -> dict[str, float]:
        """The skipped fraction of the last `window` records (empty before the first record or without a window)."""
        return {"data/window_skip_fraction": sum(self.recent) / len(self.recent)} if self.recent else {}

    def state(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": dict(self.skipped), "recent": "".join(map(str, self.recent))}

    def load(self, state: Mapping[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})
        self.recent.clear()
        self.recent.extend(int(c) for c in state.get("recent", "")[-self.window:] if self.window)


def _skip(reason: str, origin: str, detail: str) -> dict[str, str]:
    return {SKIP_KEY: reason, "origin": origin, "detail": detail}


class _SkipSample(Exception):
    """Raised inside the per-sample transform; becomes a skip marker for the main process to count."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class SampleTransform:
    """(stream index, (source index, Record)) -> one sample dict for ``packing``, or a skip marker.

    Holds only plain config values; the tokenizer and preprocessors are built lazily in whichever process runs it
    (Grain pickles the transform into its workers).

    generation_prompt: inference mode (leo_jax.infer.chat): the conversation ends with a human turn and is encoded
    up to where the answer starts (`add_generation_prompt`), so it needs no supervised token.
    """

    def __init__(self, data_config, kind: VisualKind, training: bool, generation_prompt: bool = False):
        self.config = data_config
        self.kind = kind
        self.training = training
        self.generation_prompt = generation_prompt
        self._tokenizer = None
        self._preprocessors: dict[str, Any] | None = None
        self._setup: VisualSetup | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_tokenizer=None, _preprocessors=None, _setup=None)
        return state

    # --- lazily built helpers ------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = prepare_tokenizer(self.config)
        return self._tokenizer

    @property
    def preprocessors(self) -> dict[str, Any]:
        """Batch-key prefix -> preprocessor: LEO {'tiles': intern_vit, 'sam_tiles': sam}; LEO-MINI one per expert."""
        if self._preprocessors is None:
            self._preprocessors = self.kind.preprocessors()
        return self._preprocessors

    @property
    def setup(self) -> VisualSetup:
        if self._setup is None:
            self._setup = self.kind.setup(self.preprocessors)
        return self._setup

    # --- the transform -------------------------------------------------------------------------------------------
    def __call__(self, stream_index: int, indexed_record: tuple[int, sources.Record]) -> dict[str, Any]:
        source_index, record = indexed_record
        if record.error is not None:
            reason, detail = record.error
            return _skip(reason, record.origin, detail)
        try:
            return self._sample(stream_index, source_index, record)
        except _SkipSample as skip:
            return _skip(skip.reason, record.origin, skip.detail)

    def _sample(self, stream_index: int, source_index: int, record: sources.Record) -> dict[str, Any]:
        # LLaVA-style data sometimes omits the placeholder; like LLaVA/InternVL, put the image(s) first then.
        conversations = templates.ensure_image_placeholders(record.conversations, len(record.images))
        num_tags = sum(turn[sources.TEXT_KEY].count(IMAGE_TAG) for turn in conversations)
        if num_tags != len(record.images):
            raise _SkipSample(IMAGE_TAG_MISMATCH, f"{num_tags} {IMAGE_TAG} tags, {len(record.images)} images")
        if self.kind.max_images is not None and len(record.images) > self.kind.max_images:
            raise _SkipSample(TOO_MANY_IMAGES, f"{len(record.images)} image(s) for a {self.kind.name} "
                                               f"(at most {self.kind.max_images})")
        images = [_decode_image(ref) for ref in record.images]

        rng = np.random.default_rng([int(self.config.seed), int(stream_index)])
        visual, token_counts = self.kind.visual(images, self.preprocessors, rng, self.training)
        n_items = len(next(iter(visual.values()))) if visual else 0
        if n_items > self.setup.capacity:
            raise _SkipSample(TOO_MANY_IMAGES, f"{n_items} visual items > {self.setup.capacity} slots per row")
        try:
            encoded = templates.encode_conversation(conversations, self.tokenizer, self.config.template, token_counts,
                                                    add_generation_prompt=self.generation_prompt)
        except ValueError as e:
            raise _SkipSample(BAD_CONVERSATION, str(e)) from e
        length = len(encoded.input_ids)
        if length > self.config.seq_len:
            raise _SkipSample(TOO_LONG, f"{length} tokens > seq_len {self.config.seq_len}")
        if not self.generation_prompt and not np.asarray(encoded.loss_mask)[1:].any():
            raise _SkipSample(NO_SUPERVISED_TOKENS, "no assistant token to predict")
        sample = {
            "input_ids": np.asarray(encoded.input_ids, np.int32),
            "loss_mask": np.asarray(encoded.loss_mask, np.bool_),
            "prompt_mask": np.asarray(encoded.prompt_mask, np.bool_),
            "sample_index": source_index,
        }
        for key, (item_shape, dtype) in self.setup.specs.items():
            sample[key] = visual[key] if key in visual else np.zeros((0, *item_shape), dtype)
        return sample


def _decode_image(ref: str | bytes | Image.Image) -> Image.Image:
    """Open an image from a path or encoded bytes (or take an in-memory PIL image, for inference) as RGB; raises
    _SkipSample when missing or unreadable."""
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, bytes) and not ref:
        raise _SkipSample(MISSING_IMAGE, "empty image bytes (the file was missing at conversion)")
    try:
        if isinstance(ref, str) and "://" in ref:  # remote (gs://...): read through etils.epath
            ref = epath.Path(ref).read_bytes()
        image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
        image.load()
        return image.convert("RGB")
    except FileNotFoundError as e:
        raise _SkipSample(MISSING_IMAGE, str(e)) from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        name = ref if isinstance(ref, str) else f"{len(ref)} image bytes"  # (a remote image names its bytes)
        raise _SkipSample(CORRUPT_IMAGE, f"{name}: {e}") from e


def prepare_tokenizer(data_config):
    """The configured tokenizer with the image tokens registered, checked against the template."""
    if not data_config.tokenizer:
        raise ValueError("data.tokenizer is empty: set it to a tokenizer.json, SentencePiece .model or a directory")
    return templates.setup_tokenizer(data_config.tokenizer, data_config.template)


def _skip_stats(data_config) -> SkipStats:
    return SkipStats(float(data_config.max_skip_fraction), int(data_config.min_records_checked),
                     int(data_config.skip_window), float(data_config.max_window_skip_fraction))


class PackedBatchDataset(grain.IterDataset):
    """Drops and counts skip markers, packs samples first-fit into ``layout`` rows and collates batches.

    min_batches: when the input ends early, emit empty (all-padding) batches up to this many, so every process of
    a multi-host run yields the same number of batches.
    """

    def __init__(self, parent: grain.IterDataset, layout: packing.BatchLayout, data_config, min_batches: int = 0):
        super().__init__(parent)
        self.layout = layout
        self.data_config = data_config
        self.min_batches = min_batches

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), self.layout, _skip_stats(self.data_config),
                                   self.min_batches)


class PackedBatchIterator(grain.DatasetIterator):
    """Iterator of :class:`PackedBatchDataset`; ``skip_stats`` exposes the counters for logging.

    fixed_rows (training without packing): each batch takes exactly ``batch_size`` stream elements and a skipped
    one leaves its row empty, so row r of batch b is always stream element b*batch_size + r; a sample whose tiles /
    images would overflow its row group's visual budget (data.visual_budget) is skipped too, counted and logged as
    over_visual_budget (a budget sized for the data makes this rare; the skip limits stop a run whose budget is too
    small). Otherwise samples fill rows first-fit (one per row without packing) and skipped ones are dropped; a
    sample over the budget waits for the next batch.

    State: the sample stream's state *before* the first sample not yet in an emitted batch (a sample that did not
    fit the previous batch is re-read on resume), the skip counters at that point and the number of batches emitted
    (counted from global batch 0 when the stream started at ``first_batch``).
    """

    def __init__(self, parent, layout: packing.BatchLayout, skip_stats: SkipStats, min_batches: int,
                 first_batch: int = 0, fixed_rows: bool = False):
        super().__init__(parent)
        self.fixed_rows = fixed_rows
        self.layout = layout
        self.skip_stats = skip_stats
        self.min_batches = min_batches
        self._batches_emitted = first_batch
        self._pending: dict[str, Any] | None = None  # read, valid, but did not fit the last batch
        self._pending_state: dict[str, Any] | None = None

    def __next__(self) -> dict[str, np.ndarray]:
        if self.fixed_rows:
            return self._next_fixed_rows()
        batch = packing.FirstFitBatch(self.layout)
        if self._pending is not None:
            batch.add(self._pending)
            self._pending = self._pending_state = None
        while not batch.is_full:
            state_before = self._current_state()
            try:
                element = next(self._parent)
            except StopIteration:
                if not batch.is_empty or self._batches_emitted < self.min_batches:
                    break
                raise
            if SKIP_KEY in element:
                self.skip_stats.record_skip(element[SKIP_KEY], element["origin"], element["detail"])
                continue
            self.skip_stats.record_ok()
            if not batch.add(element):
                self._pending, self._pending_state = element, state_before
                break
        self._batches_emitted += 1
        return batch.collate()

    def _next_fixed_rows(self) -> dict[str, np.ndarray]:
        rows: list[list[dict[str, Any]]] = []
        group_items = collections.Counter()
        while len(rows) < self.layout.batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                if rows or self._batches_emitted < self.min_batches:
                    break
                raise
            if SKIP_KEY not in element and self.layout.budgeted:
                group = self.layout.group_of(len(rows))[0]
                items = packing.num_visual_items(element, self.layout.visual_specs)
                if group_items[group] + items > self.layout.group_budget:
                    element = _skip(OVER_VISUAL_BUDGET, f"sample {element['sample_index']}",
                                    f"{items} visual item(s) with {group_items[group]} already in its group of rows: "
                                    f"over the group's budget of {self.layout.group_budget} (data.visual_budget / "
                                    f"{self.layout.budget_groups} groups per process); raise data.visual_budget")
                else:
                    group_items[group] += items
            if SKIP_KEY in element:
                self.skip_stats.record_skip(element[SKIP_KEY], element["origin"], element["detail"])
                rows.append([])
            else:
                self.skip_stats.record_ok()
                rows.append([element])
        self._batches_emitted += 1
        return self.layout.collate(rows)

    def _current_state(self) -> dict[str, Any]:
        # Deep copy: Grain iterators may hand out their internal state object.
        return {"stream": copy.deepcopy(self._parent.get_state()), "skips": self.skip_stats.state()}

    def get_state(self) -> dict[str, Any]:
        state = dict(self._pending_state) if self._pending_state is not None else self._current_state()
        state["batches_emitted"] = self._batches_emitted
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["stream"])
        self.skip_stats.load(state["skips"])
        self._batches_emitted = int(state["batches_emitted"])
        self._pending = self._pending_state = None

    def __str__(self) -> str:
        return f"PackedBatchIterator(layout={self.layout})"


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} out of range for process_count {count}")
    return index, count


class _ProcessRows(grain.MapDataset):
    """The positions of ``parent`` that process ``index`` holds in each global batch of ``global_batch`` rows
    (``global_batch / count`` contiguous positions per batch), starting at global batch ``start_batch``. A last
    partial global batch gives each process the positions of its slice that exist (possibly none)."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int, start_batch: int = 0):
        super().__init__(parent)
        self._global, self._local = global_batch, global_batch // count
        self._offset = start_batch * global_batch + index * self._local
        remaining = max(len(parent) - start_batch * global_batch, 0)
        full, rest = divmod(remaining, global_batch)
        self._length = full * self._local + min(max(rest - index * self._local, 0), self._local)

    def __len__(self) -> int:
        return self._length

    def _position(self, k: int) -> int:
        batch, row = divmod(k, self._local)
        return self._offset + batch * self._global + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._position(index)]

    def __str__(self) -> str:
        return f"_ProcessRows(global_batch={self._global}, local={self._local}, offset={self._offset})"


@dataclasses.dataclass(frozen=True)
class _AttachStreamIndex:
    """element -> (its global stream position, element): per-sample randomness is seeded by the global position."""

    def __call__(self, index: int, element: Any) -> tuple[int, Any]:
        return index, element


@dataclasses.dataclass(frozen=True)
class _ApplyIndexed:
    """(stream position, element) -> transform(stream position, element)."""

    transform: Any

    def __call__(self, indexed: tuple[int, Any]) -> Any:
        return self.transform(*indexed)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"batch size {global_batch_size} is not divisible by the {process_count} processes")
    return global_batch_size // process_count


def _sample_stream(data_config, files: str, image_root: str, kind: VisualKind, training: bool, process_index: int,
                   process_count: int, start_batch: int = 0):
    """MapDataset of (source index, Record) -> this process's part -> per-sample transform -> IterDataset with
    workers; also the number of global batches the stream holds (None when it repeats without end).

    Training: the rows of each global batch that this process holds (see the module docstring), from global batch
    `start_batch` on. Evaluation: records i::process_count in source order."""
    source = sources.open_sources(files, image_root or None, split=data_config.split)
    ds = grain.MapDataset.source(source).map_with_index(_AttachSourceIndex(len(source)))
    num_batches = None
    if training:
        if data_config.shuffle:
            ds = ds.shuffle(seed=int(data_config.seed))
        ds = ds.repeat(data_config.num_epochs).map_with_index(_AttachStreamIndex())
        global_batch = int(data_config.global_batch_size)
        if data_config.num_epochs is not None:
            num_batches = math.ceil(len(ds) / global_batch)
        ds = _ProcessRows(ds, global_batch, process_index, process_count, start_batch)
        ds = ds.map(_ApplyIndexed(SampleTransform(data_config, kind, training)))
    else:
        ds = ds[process_index::process_count].map_with_index(SampleTransform(data_config, kind, training))
    read_options = grain.ReadOptions(
        num_threads=int(data_config.read_threads), prefetch_buffer_size=int(data_config.read_buffer_size)
    )
    it_ds = ds.to_iter_dataset(read_options)
    if data_config.num_workers > 0:
        from absl import flags  # grain workers read absl flags; unparsed flags fail in spawned processes

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=int(data_config.num_workers), per_worker_buffer_size=int(data_config.worker_buffer_size)
            )
        )
    return it_ds, len(source), num_batches


@dataclasses.dataclass(frozen=True)
class _AttachSourceIndex:
    """(index, record) -> (record's index in the source, record); later epochs ask for index + epoch * size."""

    num_records: int

    def __call__(self, index: int, record: sources.Record) -> tuple[int, sources.Record]:
        return index % self.num_records, record


def visual_budget_groups(budget: int, global_batch: int, process_count: int, batch_shards: int,
                         grad_accum_steps: int) -> tuple[int, int]:
    """(groups of rows per process, visual items per group) for a global `budget` of visual items per step: one
    group per device block of the batch axis (`batch_shards` blocks) and micro-batch, so the model gathers each
    device's items from its own rows; (1, -1) without a budget (-1)."""
    if budget == -1:
        return 1, -1
    groups = batch_shards * grad_accum_steps
    if batch_shards % process_count or global_batch % groups:
        raise ValueError(f"data.visual_budget={budget}: the {global_batch} rows of a step split into {batch_shards} "
                         f"device blocks x {grad_accum_steps} micro-batches over {process_count} process(es); these "
                         "must divide evenly (or set data.visual_budget=-1: every slot)")
    if budget % groups:
        raise ValueError(f"data.visual_budget={budget} must be a multiple of the {groups} row groups of a step "
                         f"({batch_shards} device blocks of the batch axis x {grad_accum_steps} micro-batches), e.g. "
                         f"{max(budget // groups, 1) * groups}, or -1 (every slot)")
    return groups // process_count, budget // groups


def batch_layout(data_config, kind: VisualKind, batch_size: int, packed: bool,
                 budget_groups: tuple[int, int, int] = (1, -1, 1)) -> packing.BatchLayout:
    """The static batch shape for ``kind`` from the data config; `budget_groups` = (groups of rows, visual items
    per group, micro-batches) of a visual budget (`visual_budget_groups`), by default none."""
    tokenizer = prepare_tokenizer(data_config)
    setup = kind.setup(kind.preprocessors())
    groups, group_budget, accum = budget_groups
    return packing.BatchLayout(
        batch_size=batch_size,
        seq_len=int(data_config.seq_len),
        visual_capacity=setup.capacity,
        visual_mask_key=setup.mask_key,
        visual_specs=setup.specs,
        pad_id=int(tokenizer.pad_id),
        max_segments=int(data_config.max_samples_per_row) if packed else 1,
        seq_buckets=tuple(data_config.seq_buckets),
        group_budget=group_budget if setup.capacity else -1,
        budget_groups=groups,
        budget_accum=accum,
    )


def make_train_iterator(
    data_config, kind: VisualKind, *, process_index: int | None = None, process_count: int | None = None,
    start_batch: int = 0, batch_shards: int = 1, grad_accum_steps: int = 1,
) -> PackedBatchIterator:
    """Training batches for this process: shuffled by ``seed``, augmented, optionally packed, resumable.

    Each process reads its rows of each global batch and yields ``global_batch_size / process_count`` rows; combine
    them with :func:`to_global_batch`. ``get_state()`` / ``set_state()`` give exact resume on the same process
    count; without packing, ``start_batch=b`` starts at global batch b on any process count. With a finite
    ``num_epochs`` and no packing every process yields the same number of batches (empty ones where it holds no
    row of the last global batch).

    With a visual budget (the kind's `budget`, from data.visual_budget) the batches carry ``visual_index`` for
    `batch_shards` device blocks of the batch axis (the mesh's, `leo_jax.sharding.batch_shards`) and
    `grad_accum_steps` micro-batches (see ``packing.BatchLayout``).
    """
    process_index, process_count = _process_info(process_index, process_count)
    if start_batch and data_config.packing:
        raise ValueError("start_batch needs data.packing=False: packed batches depend on the process count, so a "
                         "packed run resumes from its saved per-process iterator state only")
    stream, _, num_batches = _sample_stream(data_config, data_config.train_files, data_config.image_root, kind, True,
                                            process_index, process_count, start_batch)
    groups = visual_budget_groups(kind.budget, int(data_config.global_batch_size), process_count, batch_shards,
                                  grad_accum_steps)
    layout = batch_layout(
        data_config, kind, _local_batch_size(data_config.global_batch_size, process_count), data_config.packing,
        (*groups, grad_accum_steps),
    )
    min_batches = 0 if data_config.packing or num_batches is None else num_batches
    return PackedBatchIterator(iter(stream), layout, _skip_stats(data_config), min_batches, start_batch,
                               fixed_rows=not data_config.packing)


def make_eval_iterator(
    data_config, kind: VisualKind, *, process_index: int | None = None, process_count: int | None = None
) -> PackedBatchIterator:
    """One pass over ``eval_files`` (default: the training files) in order: no shuffle, no augmentation, no packing.

    The last batch is padded with empty rows (segment_ids 0, sample_index -1), and every process yields the same
    number of batches (ceil(ceil(records / processes) / local batch)), padding with empty batches if needed.
    """
    process_index, process_count = _process_info(process_index, process_count)
    if data_config.eval_files:
        files, image_root = data_config.eval_files, data_config.eval_image_root
    else:  # no separate eval set: one pass over the training files
        files, image_root = data_config.train_files, data_config.image_root
    stream, total, _ = _sample_stream(data_config, files, image_root, kind, False, process_index, process_count)
    batch_size = _local_batch_size(data_config.eval_batch_size, process_count)
    layout = batch_layout(data_config, kind, batch_size, packed=False)
    num_batches = math.ceil(math.ceil(total / process_count) / batch_size)
    return iter(PackedBatchDataset(stream, layout, data_config, min_batches=num_batches))


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh, spec) -> dict[str, jax.Array]:
    """Assemble each process's local rows into global arrays sharded over ``mesh``.

    spec: a PartitionSpec for the leading (batch) axes, applied to every entry (e.g. ``P(('data', 'fsdp'))``), or a
    mapping key -> PartitionSpec. Each process's rows land on its own devices' slice of the sharded batch axis.
    """
    out = {}
    for key, value in local_batch.items():
        key_spec = spec[key] if isinstance(spec, Mapping) else spec
        sharding = jax.sharding.NamedSharding(mesh, key_spec)
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out

