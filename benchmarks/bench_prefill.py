"""Efficiency of token reduction, side by side in one run: prefill latency and decode tokens/s of LEO-style (every
vision-expert token reaches the LLM: config.model.cotr.mode='keep_all') against LEO-MINI (CoTR's N^V tokens per
image), with the same experts, LLM, weights of the same shapes and the same images and questions.

Random weights (no stop token is emitted, so every row decodes all new tokens); the batch comes through the
inference engine's preprocessing (each model's own number of <IMG_CONTEXT> tokens). Prefill = visual tokens (experts,
CoTR, projector) + the LLM's pass over the prompt into the KV cache; decode = one cached step per new token. Each
measurement: one warm-up call (compilation) excluded, then --repeats timed calls, median reported. Next to the
measured ratios it prints the ratio of the models' forward FLOPs per sample (as `python -m leo_jax.summary`
computes them) at each model's padded prompt length.

    python -m benchmarks.bench_prefill --config leo_mini_llama3_8b [--batch 1] [--new-tokens 32] [--repeats 5]
    python -m benchmarks.bench_prefill --quick   # CPU: tiny_leo_mini, both experts on 8 x 8 token grids

Any config field can be overridden (--config.model.cotr.num_queries=144 ...). 'keep_all' needs every expert to
give the same token count (set feature-map experts' `grid`).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from leo_jax.config import parse_cli
from leo_jax.data import synthetic
from leo_jax.infer.chat import InferenceEngine, Request
from leo_jax.infer.generate import SamplingConfig, _decode_step, _prefill_batch
from leo_jax.models.registry import build_model, model_config


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(median seconds, all timings) of `repeats` calls after one warm-up call; fn blocks until its result is ready."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure(name: str, config, records, image_dir: str, args) -> dict:
    model = build_model(config.model, nnx.Rngs(0))
    engine = InferenceEngine(model, config)
    requests = [Request.single(r["conversations"][0]["value"], [os.path.join(image_dir, r["image"])])
                for r in records]
    batch, lengths = engine.prepare(requests)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    lengths = jnp.asarray(lengths, jnp.int32)
    graphdef, states = engine.graphdef, (engine.state,)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, pad_id=int(engine.tokenizer.pad_id))
    lm_graphdef, lm_state = nnx.split(model.language_model)
    keys = jax.random.split(jax.random.key(0), args.new_tokens)

    def prefill():
        return jax.block_until_ready(_prefill_batch(graphdef, states, batch, lengths, args.new_tokens))

    prepared = []

    def decode():  # from a fresh prefill state each time (the step donates its state); prefill not timed
        state, routing = prepared.pop() if prepared else prefill()
        for key in keys:
            state, token = _decode_step(lm_graphdef, lm_state, state, key, routing, sampling)
        jax.block_until_ready(token)

    prefill_s, prefill_all = timed(prefill, args.repeats)
    decode_times = []
    decode()  # warm-up (compiles the step)
    for _ in range(args.repeats):
        prepared.append(prefill())
        start = time.perf_counter()
        decode()
        decode_times.append(time.perf_counter() - start)
    decode_s = statistics.median(decode_times)
    cfg = model_config(config.model)
    padded = int(batch["input_ids"].shape[1])
    return {"name": name, "tokens_per_image": cfg.visual_tokens_per_image(), "prompt_len": padded,
            "prefill_s": prefill_s, "prefill_all": prefill_all, "decode_tok_s": len(records) * args.new_tokens
            / decode_s, "flops": cfg.forward_flops(padded)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="leo_mini_llama3_8b", help="LEO-MINI preset (default leo_mini_llama3_8b)")
    parser.add_argument("--batch", type=int, default=1, help="images (questions) per batch (default 1)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU quick mode: tiny_leo_mini with ConvNeXt on CLIP's 8 x 8 grid, 8 new tokens, "
                             "3 repeats")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv += (["--config", "tiny_leo_mini", "--config.model.experts.convnext.grid=8"] if "--quick" in argv
                 else ["--config", parser.get_default("config")])
    name = argv[argv.index("--config") + 1]
    config, args = parse_cli(parser, argv)
    if args.quick:
        args.new_tokens, args.repeats = min(args.new_tokens, 8), min(args.repeats, 3)
    if config.model.get("kind") != "leo_mini":
        parser.error(f"--config {name}: a LEO-MINI preset is needed (model.kind 'leo_mini')")
    if min(args.batch, args.new_tokens, args.repeats) <= 0:
        parser.error("--batch, --new-tokens and --repeats must be positive")
    leo_style = config.copy_and_resolve_references()
    leo_style.model.cotr.mode = "keep_all"
    print(f"prefill / decode benchmark: {name}, batch {args.batch}, {args.new_tokens} new tokens; "
          f"{jax.devices()[0].platform} x{jax.device_count()} ({jax.devices()[0].device_kind}); "
          f"warm-up call excluded, median of {args.repeats} timed calls")
    with tempfile.TemporaryDirectory() as tmp:
        records = synthetic.write_split(tmp, "val", args.batch, seed=0, image_size=336)
        results = [measure("LEO-style (all tokens)", leo_style, records, tmp, args),
                   measure("LEO-MINI (CoTR)", config, records, tmp, args)]
    for r in results:
        print(f"{r['name']:<24} {r['tokens_per_image']:5d} visual tokens/image  prompt {r['prompt_len']:5d} tokens  "
              f"prefill {r['prefill_s'] * 1e3:9.2f} ms (median; all: "
              f"{', '.join(f'{t * 1e3:.1f}' for t in r['prefill_all'])})  decode {r['decode_tok_s']:9.1f} tokens/s  "
              f"forward {r['flops'] / 1e9:10.3f} GFLOPs/sample")
    leo, mini = results
    print(f"ratio LEO-style / LEO-MINI: prefill latency {leo['prefill_s'] / mini['prefill_s']:.2f}x, "
          f"decode tokens/s {leo['decode_tok_s'] / mini['decode_tok_s']:.2f}x, "
          f"forward FLOPs (summary) {leo['flops'] / mini['flops']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
