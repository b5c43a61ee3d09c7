"""A local lmms-eval task over a benchmark JSONL file (the format of `python -m leo_jax.eval`, e.g. the synthetic
set's validation questions), scored exactly as `python -m leo_jax.eval` scores it.

    python -m leo_jax.eval.lmms_task --data runs/tiny_leo_mini/synthetic/val.jsonl --out lmms_tasks/
    python -m lmms_eval --model leo_jax --model_args pretrained=runs/tiny_leo_mini --tasks leo_bench \
        --include_path lmms_tasks/ --batch_size 1 --output_path lmms_out/

writes OUT/TASK.jsonl (one document per benchmark record: the prompt as `python -m leo_jax.eval` words it, the
absolute image paths, references, metric, options) and OUT/TASK.yaml, a `generate_until` task that lmms-eval loads
through `datasets`' json builder from that file (named relative to the YAML, which lmms-eval resolves against the
YAML's directory; nothing is downloaded). The YAML names the document functions below by module path
(`!function leo_jax.eval.lmms_task.doc_to_text`, which lmms-eval imports), so OUT holds data only. The task's metric
`score` is the mean of each record's `leo_jax.scoring` score: the overall score of `python -m leo_jax.eval`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from leo_jax import scoring
from leo_jax.eval import benchmark

MODULE = "leo_jax.eval.lmms_task"  # this module's import path (the YAML names its functions; __name__ may be __main__)
DEFAULT_TASK = "leo_bench"
METRIC = "score"
OPTIONS_KEY = "options_json"  # options as JSON text: a list or a mapping, which one datasets column cannot hold


def document(record: benchmark.BenchmarkRecord) -> dict:
    """One task document: id, prompt (`BenchmarkRecord.prompt`), images (absolute paths), answers, metric,
    question_type ('' when none), options_json ('' when none)."""
    return {"id": record.id, "prompt": record.prompt(), "images": list(record.images),
            "answers": list(record.references), "metric": record.metric, "question_type": record.question_type or "",
            OPTIONS_KEY: "" if record.options is None else json.dumps(record.options)}


def doc_to_visual(doc: dict) -> list:
    """The document's images as RGB PIL images (the adapter hands them to the model's own preprocessing)."""
    from PIL import Image

    out = []
    for path in doc["images"]:
        with Image.open(path) as image:
            out.append(image.convert("RGB"))
    return out


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["prompt"]


def doc_to_target(doc: dict) -> str:
    return doc["answers"][0]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """{'score': the record's `leo_jax.scoring` score of the model's answer (results[0])}."""
    record = {"prediction": results[0], "answers": list(doc["answers"])}
    if doc[OPTIONS_KEY]:
        record["options"] = json.loads(doc[OPTIONS_KEY])
    return {METRIC: scoring.score_record(record, [doc["metric"]])[doc["metric"]]}


def task_yaml(task: str, data_file: str, max_new_tokens: int) -> str:
    """The lmms-eval task definition over `data_file` (a path relative to the YAML's directory)."""
    module = MODULE
    return "\n".join([
        f"# lmms-eval task written by `python -m {module}`; scores as `python -m leo_jax.eval`.",
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(data_file)}",
        "test_split: test",
        "output_type: generate_until",
        f"doc_to_visual: !function {module}.doc_to_visual",
        f"doc_to_text: !function {module}.doc_to_text",
        f"doc_to_target: !function {module}.doc_to_target",
        "generation_kwargs:",
        f"  max_new_tokens: {max_new_tokens}",
        "  temperature: 0",
        "  do_sample: false",
        f"process_results: !function {module}.process_results",
        "metric_list:",
        f"  - metric: {METRIC}",
        "    aggregation: mean",
        "    higher_is_better: true",
        "",
    ])


def write_task(data: str, out_dir: str, task: str = DEFAULT_TASK, *, max_new_tokens: int = 16,
               limit: int | None = None) -> tuple[str, str]:
    """Writes OUT/TASK.jsonl and OUT/TASK.yaml from the benchmark file `data`; returns their paths."""
    if not task.replace("_", "").isalnum():
        raise ValueError(f"task name {task!r}: use letters, digits and underscores (it names the YAML file and "
                         "lmms-eval's --tasks entry)")
    records = benchmark.read_benchmark(data, limit=limit)
    os.makedirs(out_dir, exist_ok=True)
    data_file = os.path.join(out_dir, f"{task}.jsonl")
    with open(data_file, "w") as f:
        f.writelines(json.dumps(document(record)) + "\n" for record in records)
    yaml_file = os.path.join(out_dir, f"{task}.yaml")
    with open(yaml_file, "w") as f:
        f.write(task_yaml(task, os.path.basename(data_file), max_new_tokens))
    return data_file, yaml_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="benchmark .jsonl, as `python -m leo_jax.eval --data` takes")
    parser.add_argument("--out", required=True, help="directory for TASK.yaml and TASK.jsonl (lmms-eval's "
                        "--include_path)")
    parser.add_argument("--task", default=DEFAULT_TASK, help=f"task name (default {DEFAULT_TASK})")
    parser.add_argument("--max-new-tokens", type=int, default=16,
                        help="answer length limit (default 16, as python -m leo_jax.eval)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--max-new-tokens and --limit must be >= 1")
    try:
        data_file, yaml_file = write_task(args.data, args.out, args.task, max_new_tokens=args.max_new_tokens,
                                          limit=args.limit)
    except (benchmark.BenchmarkError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {yaml_file} and {data_file}; run: python -m lmms_eval --model leo_jax --model_args "
          f"pretrained=DIR --tasks {args.task} --include_path {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
