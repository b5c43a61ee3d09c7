"""CoTR ablation in miniature: does text-conditioned token reduction beat unconditioned reduction at the same token
budget? Trains tiny LEO-MINI variants on the built-in synthetic set, same steps and data, several seeds each.

    python -m leo_jax.experiments.cotr_ablation --out DIR [--steps 1000] [--seeds 0,1,2] [--quick]

Variants (preset tiny_leo_mini_train with one-image questions only, both experts on 8 x 8 token grids so every
variant sees the same 64 + 64 expert tokens per image; CoTR's other settings are the preset's):
- cotr: CoTR as in the paper, the prompt row on (text_bias), 16 tokens per image;
- cotr_no_text: the same without the prompt row (query term and spatial prior only), 16 tokens;
- avg_pool: fixed 2 x 2 average pooling of each expert's 8 x 8 grid to 4 x 4, no learned reduction, 16 tokens;
- keep_all: no reduction (LEO-style token count), all 64 tokens per image.
Each run's final validation accuracy per question type goes to DIR/runs/<variant>/seed<k>/result.json (a rerun
skips finished runs and resumes unfinished ones from their checkpoints); the table (mean and sample standard
deviation over seeds, visual tokens per image, forward FLOPs per sample) is printed and written to
DIR/ablation.json. --quick trains a few steps on a few samples: it checks the harness, not the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

import numpy as np

from leo_jax.config import load_config
from leo_jax.data import synthetic
from leo_jax.models.registry import model_config
from leo_jax.train.loop import train
from leo_jax.train.synthetic_data import ensure_synthetic_data

EXPERT_GRID = 8  # ConvNeXt's feature map kept at CLIP's 8 x 8 token grid: 'keep_all' concatenates equal counts
TEXT_TOKENS = 80  # text budget of a row (the preset's seq_len 96 minus its 16 visual tokens)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of the ablation: its config.model.cotr changes over the preset."""

    name: str
    description: str
    cotr: dict

    def config(self, seed: int, steps: int, data_dir: str, quick: bool):
        config = load_config("tiny_leo_mini_train")
        config.model.experts.convnext.grid = EXPERT_GRID
        config.model.cotr.update(self.cotr)
        config.seed = seed
        config.data.seed = seed
        config.synthetic.dir = data_dir
        # one image per question: every evaluated question names the object it is about (two-image questions
        # compare object counts, which no per-image reduction is conditioned for)
        config.synthetic.multi_image_fraction = 0.0
        config.data.leo_mini.max_images_per_row = 1
        config.data.seq_len = model_config(config.model).visual_tokens_per_image() + TEXT_TOKENS
        config.train.steps = steps
        config.train.checkpoint_every = max(steps // 2, 1)
        config.train.log_every = max(steps // 10, 1)
        config.train.update(eval_every=0, eval_at_end=True)  # one evaluation, at the last step: the result
        if quick:  # one layer per network: compilation dominates a few-step run
            config.model.experts.clip.encoder.num_layers = 1
            config.model.llm.num_layers = 1
            config.synthetic.update(num=64, val_num=16)
            config.data.update(global_batch_size=8, eval_batch_size=16)  # divisible by up to 8 devices
            config.train.warmup_fraction = 0.0
        return config


VARIANTS = (
    Variant("cotr", "CoTR as in the paper (prompt row on)", {}),
    Variant("cotr_no_text", "CoTR without the prompt row (unconditioned)", {"text_bias": False}),
    Variant("avg_pool", "fixed average pooling to the 4 x 4 query grid", {"mode": "avg_pool"}),
    Variant("keep_all", "no reduction: every expert token (LEO-style)", {"mode": "keep_all"}),
)


def run_one(variant: Variant, seed: int, steps: int, out: str, quick: bool) -> dict:
    """Trains (or resumes) one variant/seed and returns its result, cached in its work directory."""
    workdir = os.path.join(out, "runs", variant.name, f"seed{seed}")
    path = os.path.join(workdir, "result.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    config = variant.config(seed, steps, os.path.join(out, "synthetic"), quick)
    cfg = model_config(config.model)
    start = time.time()
    ensure_synthetic_data(config, workdir)  # the shared set in DIR/synthetic, written by the first run
    metrics = train(config, workdir)
    if "eval/exact_match" not in metrics:  # evaluation runs only at the last step (train.eval_every = 0)
        raise SystemExit(f"{workdir}: the run stopped before step {steps} (SIGTERM?) and has no result; its "
                         "checkpoint is saved: rerun the same command to resume it")
    result = {"variant": variant.name, "seed": seed, "steps": steps, "wall_s": round(time.time() - start, 1),
              "visual_tokens_per_image": cfg.visual_tokens_per_image(), "seq_len": int(config.data.seq_len),
              "forward_flops_per_sample": cfg.forward_flops(int(config.data.seq_len)),
              "cotr_forward_flops": cfg.cotr_config.forward_flops(TEXT_TOKENS),
              "accuracy": {k.split("/")[1]: float(v) for k, v in metrics.items()
                           if k.startswith("eval/") and k.endswith("/accuracy")},
              "exact_match": float(metrics.get("eval/exact_match", float("nan"))),
              "majority": {k.split("/")[1]: float(v) for k, v in metrics.items() if k.endswith("/majority_accuracy")}}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def several_objects(data_dir: str) -> dict[str, float]:
    """Per evaluated question type: the fraction of validation questions whose image holds more than one object (the
    question's wording is then what picks the object)."""
    with open(os.path.join(data_dir, "val.json")) as f:
        records = json.load(f)
    out = {}
    for question_type in synthetic.QUESTION_TYPES:
        counts = [len(r["scenes"][0]["objects"]) for r in records if r["question_type"] == question_type]
        if counts:
            out[question_type] = float(np.mean(np.array(counts) > 1))
    return out


def summarize(results: list[dict]) -> dict:
    """{variant: {tokens, flops, accuracy: {type: {mean, std, per_seed}}, exact_match: {...}}} in variant order."""
    table = {}
    for variant in VARIANTS:
        runs = sorted((r for r in results if r["variant"] == variant.name), key=lambda r: r["seed"])
        if not runs:
            continue
        stats = lambda values: {"mean": float(np.mean(values)),  # noqa: E731
                                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                                "per_seed": [float(v) for v in values]}
        types = [t for t in synthetic.QUESTION_TYPES if t in runs[0]["accuracy"]]
        table[variant.name] = {
            "description": variant.description, "seeds": [r["seed"] for r in runs],
            "visual_tokens_per_image": runs[0]["visual_tokens_per_image"], "seq_len": runs[0]["seq_len"],
            "forward_flops_per_sample": runs[0]["forward_flops_per_sample"],
            "accuracy": {t: stats([r["accuracy"][t] for r in runs]) for t in types},
            "exact_match": stats([r["exact_match"] for r in runs]),
            "wall_s": float(sum(r["wall_s"] for r in runs))}
    return table


def format_table(table: dict, majority: dict[str, float]) -> str:
    types = next(iter(table.values()))["accuracy"].keys() if table else []
    header = ["variant", "tokens/img", "GFLOPs/sample"] + list(types) + ["all"]
    rows = [header]
    for name, row in table.items():
        cells = [f"{row['accuracy'][t]['mean']:.3f} ± {row['accuracy'][t]['std']:.3f}" for t in types]
        cells.append(f"{row['exact_match']['mean']:.3f} ± {row['exact_match']['std']:.3f}")
        rows.append([name, str(row["visual_tokens_per_image"]), f"{row['forward_flops_per_sample'] / 1e9:.3f}"]
                    + cells)
    rows.append(["(majority answer)", "", ""] + [f"{majority.get(t, float('nan')):.3f}" for t in types] + [""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leo_jax.experiments.cotr_ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (runs, synthetic set, ablation.json)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run (default 1000)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                        help="comma-separated subset of " + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--quick", action="store_true",
                        help="toy size (2 steps, one-layer networks, 64 training / 16 validation samples, seed "
                             "0): checks the harness, not the result")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds={args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    by_name = {v.name: v for v in VARIANTS}
    unknown = [n for n in args.variants.split(",") if n not in by_name]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(by_name)}")
    if args.steps <= 0 or not seeds:
        parser.error("--steps must be positive and --seeds non-empty")
    steps, seeds = (2, [0]) if args.quick else (args.steps, seeds)
    variants = [by_name[n] for n in args.variants.split(",")]

    start = time.time()
    results = [run_one(v, s, steps, args.out, args.quick) for s in seeds for v in variants]
    data_dir = os.path.join(args.out, "synthetic")
    table = summarize(results)
    majority = results[0]["majority"]
    report = {"command": "python -m leo_jax.experiments.cotr_ablation " + " ".join(sys.argv[1:] if argv is None
                                                                                     else argv),
              "steps": steps, "seeds": seeds, "quick": args.quick, "wall_s": round(time.time() - start, 1),
              "several_objects_fraction": several_objects(data_dir), "majority_accuracy": majority,
              "variants": table, "runs": results}
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"CoTR ablation: {len(variants)} variants x seeds {seeds}, {steps} steps each "
          f"(validation accuracy per question type, mean ± sample std over seeds)")
    print(format_table(table, majority))
    print("fraction of validation questions with several objects in the image (the wording picks the object): "
          + ", ".join(f"{t} {v:.2f}" for t, v in report["several_objects_fraction"].items()))
    print(f"wall time {report['wall_s']:.0f} s (this invocation); written {os.path.join(args.out, 'ablation.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
