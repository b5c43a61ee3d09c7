"""Generation throughput of the inference engine: a batch of image questions through the training pipeline's
preprocessing, prefill, and KV-cache decoding, by the compiled decode loop and by the streaming path.

Uses a preset's model with random weights (no stop token is emitted, so every row decodes all new tokens) and the
built-in synthetic images. Compilation is excluded (one warm-up call per path). Prints new tokens/s and requests/s.

    python -m benchmarks.bench_generate [--config tiny_leo_mini] [--batch 8] [--new-tokens 32] [--repeats 3]
"""
import argparse
import os
import sys
import tempfile
import time

import jax
from flax import nnx

from leo_jax.config import load_config
from leo_jax.data import synthetic
from leo_jax.infer.chat import InferenceEngine, Request
from leo_jax.infer.generate import SamplingConfig
from leo_jax.models.registry import build_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny_leo_mini", help="LEO / LEO-MINI preset (default tiny_leo_mini)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = load_config(args.config)
    engine = InferenceEngine(build_model(config.model, nnx.Rngs(0)), config)
    with tempfile.TemporaryDirectory() as tmp:
        records = synthetic.write_split(tmp, "val", args.batch, seed=0)
        requests = [Request.single(r["conversations"][0]["value"], [os.path.join(tmp, r["image"])]) for r in records]
        sampling = SamplingConfig(max_new_tokens=args.new_tokens, pad_id=int(engine.tokenizer.pad_id))
        batch, lengths = engine.prepare(requests)
        print(f"{args.config}: batch {args.batch}, prompt lengths {min(lengths)}..{max(lengths)} (padded to "
              f"{batch['input_ids'].shape[1]}), {args.new_tokens} new tokens; {jax.devices()[0].platform} "
              f"x{jax.device_count()}")

        def compiled():
            return engine.generate_tokens(requests, sampling)

        def streamed():
            return list(engine.stream_tokens(requests, sampling))

        for name, run in (("compiled decode loop", compiled), ("streaming (host loop)", streamed)):
            run()  # compile
            start = time.perf_counter()
            for _ in range(args.repeats):
                run()
            seconds = (time.perf_counter() - start) / args.repeats
            print(f"{name:<22} {seconds:7.3f} s/batch  {args.batch * args.new_tokens / seconds:9.1f} new tokens/s  "
                  f"{args.batch / seconds:7.2f} requests/s (incl. preprocessing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
