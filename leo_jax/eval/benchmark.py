"""Benchmark evaluation of a trained checkpoint: JSONL questions -> greedy answers -> per-record scores and a summary.

Input, one JSON object per line (image paths relative to the file's directory)::

    {"id": "q1", "question": "What color is the square?", "image": "images/1.png" | ["a.png", "b.png"],
     "answers": ["red", ...] | "answer": "red", "question_type": "color",            (optional)
     "options": ["cat", "dog"] | {"A": "cat", "B": "dog"} (alias "choices"),          (optional, multiple choice)
     "metric": "anls"}                                                                (optional)

The metric of a record is its own `metric` field, else the `--metric` flag, else (auto) `multiple_choice` when the
record has options, `vqa_accuracy` with 3 or more reference answers (VQA's annotator answers), else `exact_match`.
Multiple-choice questions get their options appended as lettered lines and LLaVA's instruction to answer with the
letter. Scores come from `leo_jax.scoring`.

Outputs: predictions.jsonl (id, question, prediction, references, metric, score, question_type) and summary.json
(overall mean score, per metric and per question type, counts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from leo_jax import scoring
from leo_jax.data.sources import LlavaJsonSource
from leo_jax.infer.chat import InferenceEngine, Request
from leo_jax.infer.generate import SamplingConfig

AUTO = "auto"
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


class BenchmarkError(ValueError):
    """A malformed benchmark file; the message names file:line and the field."""


@dataclasses.dataclass(frozen=True)
class BenchmarkRecord:
    id: str
    question: str
    images: tuple[str, ...]  # absolute paths
    references: tuple[str, ...]
    metric: str
    question_type: str | None = None
    options: Any = None  # list of option texts or letter -> text mapping
    origin: str = ""  # file:line

    def prompt(self) -> str:
        """The question, with lettered options and the answer-with-a-letter instruction for multiple choice."""
        if self.options is None:
            return self.question
        lines = [f"{letter}. {text}" for letter, text in sorted(scoring.option_map(self.options).items())]
        return "\n".join([self.question, *lines, MULTIPLE_CHOICE_INSTRUCTION])

    def metric_input(self, prediction: str) -> dict:
        """The record as `scoring.score_record` takes it."""
        out = {"prediction": prediction, "answers": list(self.references)}
        if self.options is not None:
            out["options"] = self.options
        if self.question_type is not None:
            out["question_type"] = self.question_type
        return out


def auto_metric(num_references: int, has_options: bool) -> str:
    if has_options:
        return "multiple_choice"
    return "vqa_accuracy" if num_references >= 3 else "exact_match"


def _field(obj: dict, name: str, types, where: str, required: bool = True):
    if name not in obj:
        if required:
            raise BenchmarkError(f"{where}: missing field '{name}' (has {sorted(obj)}); each line needs 'question' "
                                 "and 'answers' (list) or 'answer' (string), optionally 'image', 'id', "
                                 "'question_type', 'options', 'metric'")
        return None
    value = obj[name]
    if not isinstance(value, types):
        raise BenchmarkError(f"{where}: field '{name}' has type {type(value).__name__}, expected "
                             f"{' or '.join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))}")
    return value


def parse_record(obj: Any, where: str, base_dir: str, metric: str = AUTO) -> BenchmarkRecord:
    """One benchmark line -> BenchmarkRecord; errors name `where` (file:line) and the field."""
    if not isinstance(obj, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    question = _field(obj, "question", str, where)
    if "answers" in obj:
        answers = _field(obj, "answers", (list, str), where)
        references = [answers] if isinstance(answers, str) else answers
    else:
        references = [_field(obj, "answer", str, where)]
    if not references or not all(isinstance(r, str) for r in references):
        raise BenchmarkError(f"{where}: field 'answers' must be a non-empty list of strings, got {references!r}")
    images = _field(obj, "image", (str, list), where, required=False) or []
    images = [images] if isinstance(images, str) else images
    paths = []
    for image in images:
        if not isinstance(image, str):
            raise BenchmarkError(f"{where}: field 'image' must hold path strings, got {image!r}")
        path = os.path.join(base_dir, image)
        if not os.path.isfile(path):
            raise BenchmarkError(f"{where}: field 'image': file {image!r} not found (looked for {path}; image paths "
                                 "are relative to the data file's directory)")
        paths.append(path)
    options = obj.get("options", obj.get("choices"))
    if options is not None:
        try:
            scoring.option_map(options)
        except ValueError as e:
            raise BenchmarkError(f"{where}: field 'options': {e}") from e
    chosen = _field(obj, "metric", str, where, required=False) or metric
    if chosen == AUTO:
        chosen = auto_metric(len(references), options is not None)
    if chosen not in scoring.METRICS:
        raise BenchmarkError(f"{where}: metric {chosen!r} is unknown; choose one of {sorted(scoring.METRICS)}")
    question_type = obj.get("question_type")
    record_id = obj.get("id", where)
    return BenchmarkRecord(id=str(record_id), question=question, images=tuple(paths), references=tuple(references),
                           metric=chosen, question_type=None if question_type is None else str(question_type),
                           options=options, origin=where)


def read_benchmark(path: str, metric: str = AUTO, limit: int | None = None) -> list[BenchmarkRecord]:
    """The records of a benchmark JSONL file (the first `limit` when given); blank lines are skipped."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"benchmark file {path} not found")
    source = LlavaJsonSource(path, jsonl=True)
    records = []
    for index in range(len(source) if limit is None else min(limit, len(source))):
        where = f"{path}:{source.line_number(index)}"
        try:
            obj = source.raw(index)
        except ValueError as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise BenchmarkError(f"{where}: not valid JSON ({reason}); the file needs one JSON object per line "
                                 "(JSONL)") from e
        records.append(parse_record(obj, where, source.image_root, metric))
    if not records:
        raise BenchmarkError(f"{path}: no records")
    return records


def predict(engine: InferenceEngine, records: Sequence[BenchmarkRecord], *, batch_size: int, max_new_tokens: int,
            progress: Callable[[int, int, float], None] | None = None) -> list[str]:
    """Greedy answers, `batch_size` questions per generation call (`generate_batched`)."""
    requests = [Request.single(r.prompt(), r.images, origin=r.origin) for r in records]
    return generate_batched(engine, requests, engine.sampling(max_new_tokens=max_new_tokens), batch_size, progress)


def generate_batched(engine: InferenceEngine, requests: Sequence[Request], sampling: SamplingConfig,
                     batch_size: int, progress: Callable[[int, int, float], None] | None = None) -> list[str]:
    """The answer to each request, `batch_size` requests per generation call; the last call is filled up with
    repeats of its last request, so every call has the same shape and compiles once per prompt-length bucket."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    answers: list[str] = []
    started = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        chunk = list(requests[start:start + batch_size])
        answers += engine.generate(chunk + [chunk[-1]] * (batch_size - len(chunk)), sampling)[:len(chunk)]
        if progress is not None:
            progress(len(answers), len(requests), time.perf_counter() - started)
    return answers


def score_predictions(records: Sequence[BenchmarkRecord], predictions: Sequence[str]) -> list[dict]:
    """One output line per record: id, question, prediction, references, metric, score (and question_type,
    options when present)."""
    lines = []
    for index, (record, prediction) in enumerate(zip(records, predictions, strict=True)):
        value = scoring.score_record(record.metric_input(prediction), [record.metric], index)[record.metric]
        line = {"id": record.id, "question": record.question, "prediction": prediction,
                "references": list(record.references), "metric": record.metric, "score": value}
        if record.question_type is not None:
            line["question_type"] = record.question_type
        if record.options is not None:
            line["options"] = record.options
        lines.append(line)
    return lines


def summarize(records: Sequence[BenchmarkRecord], lines: Sequence[dict]) -> dict:
    """Overall mean score; per metric `scoring.score` of its records; per question type the mean score and count."""
    by_metric: dict[str, list[dict]] = defaultdict(list)
    by_type: dict[str, list[float]] = defaultdict(list)
    for record, line in zip(records, lines):
        by_metric[record.metric].append(record.metric_input(line["prediction"]))
        if record.question_type is not None:
            by_type[record.question_type].append(line["score"])
    return {
        "num_samples": len(lines),
        "score": sum(line["score"] for line in lines) / len(lines),
        "per_metric": {name: scoring.score(group, [name]) for name, group in sorted(by_metric.items())},
        "per_question_type": {name: {"num_samples": len(scores), "score": sum(scores) / len(scores)}
                              for name, scores in sorted(by_type.items())},
    }


def format_summary(summary: dict) -> str:
    lines = [f"overall: {summary['score']:.4f} over {summary['num_samples']} samples"]
    for name, result in summary["per_metric"].items():
        lines.append(f"  metric {name:<20} {result['metrics'][name]:.4f}  (n={result['num_samples']})")
    for name, result in summary["per_question_type"].items():
        lines.append(f"  type   {name:<20} {result['score']:.4f}  (n={result['num_samples']})")
    return "\n".join(lines)


def write_results(out_dir: str, lines: Sequence[dict], summary: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")


def print_progress(done: int, total: int, seconds: float) -> None:
    print(f"[eval] {done}/{total} samples ({done / max(seconds, 1e-9):.1f} samples/s)", file=sys.stderr, flush=True)
