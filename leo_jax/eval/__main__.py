"""`python -m leo_jax.eval --ckpt DIR --data FILE.jsonl [--out DIR] [--batch-size N] [--limit N] [--metric NAME]
[--mesh fsdp=8]`

Answers every question of a benchmark JSONL file with the model in DIR (greedy, KV cache), scores the answers
(leo_jax.scoring) and writes OUT/predictions.jsonl and OUT/summary.json. DIR is a training workdir (its newest
checkpoint), a step directory, a `convert import-hf` checkpoint or an exported model directory. The record format
and the metric rules are in leo_jax/eval/benchmark.py; the built-in synthetic set writes one
(DIR/synthetic/val.jsonl).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from leo_jax import scoring
from leo_jax.eval import benchmark


def default_out_dir(step_dir, step: int | None, data: str) -> str:
    """WORKDIR/eval/<data file stem>-step<step> (next to the checkpoints directory); for a model directory
    (step None) DIR/eval/<data file stem>."""
    stem = os.path.splitext(os.path.basename(data))[0]
    if step is None:
        return os.path.join(str(step_dir), "eval", stem)
    checkpoints = os.path.dirname(str(step_dir))
    workdir = os.path.dirname(checkpoints) if os.path.basename(checkpoints) == "checkpoints" else checkpoints
    return os.path.join(workdir, "eval", f"{stem}-step{step}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leo_jax.eval", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="training workdir, its checkpoints/ directory, a step dir, an "
                        "import-hf checkpoint or an exported model directory")
    parser.add_argument("--data", required=True, help="benchmark .jsonl (image paths relative to its directory)")
    parser.add_argument("--out", default=None, help="output directory (default WORKDIR/eval/<data stem>-step<N>)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generation call (default 8)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--metric", default=benchmark.AUTO, choices=[benchmark.AUTO, *sorted(scoring.METRICS)],
                        help="metric for records without a 'metric' field (default auto: multiple_choice with "
                             "options, vqa_accuracy with >= 3 answers, else exact_match)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default 16)")
    parser.add_argument("--dtype", default=None, help="cast the parameters, e.g. bfloat16 (default: as saved)")
    parser.add_argument("--mesh", default=None, help="spread the parameters over the devices by their logical axes, "
                        "e.g. fsdp=8 or data=2,tensor=4 (default: one device)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--batch-size, --max-new-tokens and --limit must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    from leo_jax.checkpoints import find_checkpoint
    from leo_jax.infer.chat import InferenceEngine, InputError
    from leo_jax.infer.loading import TRAINING, directory_kind, load_any
    from leo_jax.sharding import mesh_from_flag

    try:
        records = benchmark.read_benchmark(args.data, args.metric, args.limit)
        mesh = None if args.mesh is None else mesh_from_flag(args.mesh)
        if directory_kind(args.ckpt) == TRAINING:
            step_dir, step = find_checkpoint(args.ckpt)
        else:
            step_dir, step = os.path.abspath(args.ckpt), None
        model, config = load_any(str(step_dir), dtype=args.dtype, mesh=mesh)
        engine = InferenceEngine(model, config)
        which = f"{step_dir} (step {step})" if step is not None else str(step_dir)
        print(f"evaluating {which} on {len(records)} records of {args.data}", file=sys.stderr)
        predictions = benchmark.predict(engine, records, batch_size=args.batch_size,
                                        max_new_tokens=args.max_new_tokens, progress=benchmark.print_progress)
        lines = benchmark.score_predictions(records, predictions)
    except (benchmark.BenchmarkError, InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {**benchmark.summarize(records, lines), "checkpoint": str(step_dir), "step": step,
               "data": os.path.abspath(args.data)}
    out = args.out or default_out_dir(step_dir, step, args.data)
    benchmark.write_results(out, lines, summary)
    print(benchmark.format_summary(summary))
    print(f"wrote {os.path.join(out, 'predictions.jsonl')} and {os.path.join(out, 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
