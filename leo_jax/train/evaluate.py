"""Validation during training: greedy answers with the KV cache and exact-match accuracy (per question type for
the built-in synthetic set, overall otherwise).

Each validation batch comes from the data pipeline's eval iterator (one sample per row, full conversation). The
prompt of a row is its tokens up to the first supervised position (the assistant's answer starts right after), so
the model sees exactly what it saw in training: images written into the embeddings by `embed_inputs`, CoTR and the
MMoE routers conditioned on the prompt tokens only. `leo_jax.infer.generate.generate_from_batch` left-aligns the
prompts and decodes greedily; the answer is compared with the first assistant turn of the record.

Multi-process: each process reads its share of the records (the eval iterator gives every process the same number
of batches), the batches are assembled into global arrays on the mesh, every process runs every generation (also
with an empty share), decodes the answers of its own rows, and the answers of all processes are gathered, so every
process returns the same metrics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from leo_jax import scoring
from leo_jax.data import pipeline, sources, templates
from leo_jax.data.templates import decode_answer
from leo_jax.data.visual import VisualKind
from leo_jax.infer.generate import SamplingConfig, generate_from_batch
from leo_jax.sharding import data_sharding
from leo_jax.train import distributed
from leo_jax.train.step import device_batch

logger = logging.getLogger("leo_jax.train")


def load_annotation_records(files: str) -> list[dict] | None:
    """The raw records of comma-separated LLaVA .json / .jsonl files, in source order (None for other formats,
    e.g. ArrayRecord directories: then only overall exact match is reported)."""
    records = []
    for path in (p.strip() for p in files.split(",") if p.strip()):
        if not path.endswith((".json", ".jsonl")):
            return None
        source = sources.LlavaJsonSource(sources.local_copy(path))  # (a remote file: its local copy)
        records += [source.raw(i) for i in range(len(source))]
    return records


def prompt_lengths(loss_mask: np.ndarray) -> np.ndarray:
    """Per row: tokens up to and including the one predicting the first answer token (0 for empty rows)."""
    has = loss_mask.any(axis=1)
    return np.where(has, np.argmax(loss_mask > 0, axis=1) + 1, 0).astype(np.int32)


class Evaluator:
    """Greedy answers on the validation split -> {'eval/exact_match', 'eval/<type>/accuracy', ...}; compiles once
    per model structure and batch shape."""

    def __init__(self, graphdef: nnx.GraphDef, data_config, kind: VisualKind, *, max_batches: int,
                 max_new_tokens: int):
        self.graphdef = graphdef
        self.data_config, self.kind, self.max_batches = data_config, kind, max_batches
        self.tokenizer = pipeline.prepare_tokenizer(data_config)
        self.raw_records = load_annotation_records(data_config.eval_files or data_config.train_files)
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, eos_ids=tuple(templates.stop_token_ids(
            self.tokenizer, data_config.template)), pad_id=int(self.tokenizer.pad_id))

    def __call__(self, trainable, frozen, mesh: jax.sharding.Mesh) -> dict[str, float]:
        iterator = pipeline.make_eval_iterator(self.data_config, self.kind)
        indices, predictions, targets = [], [], []
        stop = self.sampling.eos_ids
        for batch_number, batch in enumerate(iterator):
            if 0 <= self.max_batches <= batch_number:
                break
            lengths = prompt_lengths(batch["loss_mask"])
            local = _pad_rows({**device_batch(batch), "lengths": lengths}, _local_batch_shards(mesh))
            inputs = {k: jax.make_array_from_process_local_data(data_sharding(mesh, v.ndim), v)
                      for k, v in local.items()}
            lengths_global = inputs.pop("lengths")
            tokens = generate_from_batch(self.graphdef, (trainable, frozen), inputs, lengths_global, self.sampling)
            tokens = np.asarray(multihost_utils.global_array_to_host_local_array(
                tokens, mesh, data_sharding(mesh, tokens.ndim).spec))  # this process's rows
            for r in np.nonzero(lengths > 0)[0]:
                predictions.append(decode_answer(self.tokenizer, tokens[r], stop))
                targets.append(_target_answer(self.tokenizer, batch, r, lengths[r], stop))
                indices.append(int(batch["sample_index"][r, 0]))
        gathered = distributed.allgather_json("eval_answers", [indices, predictions, targets])
        indices, predictions, targets = ([x for one in gathered for x in one[i]] for i in range(3))
        return answer_metrics(indices, predictions, targets, self.raw_records)


def _local_batch_shards(mesh: jax.sharding.Mesh) -> int:
    """How many slices of the batch axis this process's devices hold (its rows must divide evenly among them)."""
    axes = data_sharding(mesh, 1).spec[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return max(math.prod(mesh.shape[a] for a in axes) // jax.process_count(), 1)


def _pad_rows(local: Mapping[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Appends empty rows (zeros: prompt length 0, nothing generated for them) up to a multiple of `multiple`, so any
    eval batch size runs on any number of data-parallel devices."""
    rows = len(local["lengths"])
    extra = -rows % multiple
    return {k: np.pad(np.asarray(v), [(0, extra)] + [(0, 0)] * (np.ndim(v) - 1)) for k, v in local.items()}


def _target_answer(tokenizer, batch: Mapping[str, np.ndarray], row: int, length: int, stop_ids) -> str:
    """The first supervised answer of the row, from its labels."""
    mask = batch["loss_mask"][row] > 0
    start = length - 1
    end = start + int(np.argmin(mask[start:])) if not mask[start:].all() else mask.size
    return decode_answer(tokenizer, batch["labels"][row, start:end], stop_ids)


def answer_metrics(indices: list[int], predictions: list[str], targets: list[str],
                   raw_records: list[dict] | None) -> dict[str, Any]:
    metrics = {"eval/num": float(len(predictions)),
               "eval/exact_match": float(np.mean([scoring.exact_match(p, [t]) for p, t in zip(predictions, targets)]))
               if predictions else 0.0}
    if raw_records is not None and all("question_type" in raw_records[i] for i in indices):
        per_type = scoring.per_type_accuracy([raw_records[i] for i in indices], predictions)
        for question_type, values in per_type.items():
            metrics[f"eval/{question_type}/accuracy"] = values["accuracy"]
            metrics[f"eval/{question_type}/majority_accuracy"] = values["majority_accuracy"]
    return metrics
