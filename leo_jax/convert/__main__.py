"""Command line for weight conversion.

    python -m leo_jax.convert import-hf --src HF_DIR --out CKPT_DIR [--family llama|qwen2|internlm2|...]
    python -m leo_jax.convert export-hf --src CKPT_DIR --out HF_DIR [--dtype bfloat16] [--max-shard-gb 5]
    python -m leo_jax.convert export --ckpt TRAIN_DIR --out DIR [--components] [--dtype bfloat16] [--tokenizer PATH]
                                     [--allow-nonofficial]

`export` writes the model of a training checkpoint (a workdir, its checkpoints/ or one step directory) as
config.json + safetensors: LEO in the official LEO layout (vision_model_1/vision_model_2/mlp1/mlp2/language_model,
loadable by leo_jax.pytorch.LeoModel), LEO-MINI in leo_jax.pytorch.LeoMiniForCausalLM's layout, an LLM in its Hugging
Face family's layout; LEO / LEO-MINI directories also hold the tokenizer (tokenizer_config.json with the training
chat template) and preprocessor_config.json, so the directory alone is enough. A LEO that the official LEO code
cannot build (e.g. mlp2's input width differing from mlp1's) is refused, naming the fields, unless
--allow-nonofficial. `--components` also writes each part (LLM, vision encoders) as its own Hugging Face directory
under OUT/components/. `import-hf` reads any of these back (whole models included).
"""

from __future__ import annotations

import argparse
import sys
import time

from leo_jax.convert.api import export_hf, export_trained, import_hf
from leo_jax.convert.core import ConversionError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leo_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="Hugging Face directory -> leo_jax checkpoint")
    imp.add_argument("--src", required=True, help="directory with config.json and *.safetensors")
    imp.add_argument("--out", required=True, help="new leo_jax checkpoint directory")
    imp.add_argument("--family", default=None, help="override the family detected from config.json's model_type")
    imp.add_argument("--param-dtype", default="float32", help="storage dtype of the imported parameters")
    exp = sub.add_parser("export-hf", help="leo_jax checkpoint -> Hugging Face directory")
    exp.add_argument("--src", required=True, help="leo_jax checkpoint directory (from import-hf or training)")
    exp.add_argument("--out", required=True, help="output directory (config.json + safetensors)")
    exp.add_argument("--dtype", default=None, help="tensor dtype (default: the dtype of the imported checkpoint)")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="split safetensors above this size")
    whole = sub.add_parser("export", help="training checkpoint -> whole-model PyTorch / Hugging Face directory")
    whole.add_argument("--ckpt", required=True, help="training workdir, its checkpoints/ dir or one step directory")
    whole.add_argument("--out", required=True, help="output directory (config.json + safetensors)")
    whole.add_argument("--dtype", default=None, help="tensor dtype (default: the parameters' own)")
    whole.add_argument("--components", action="store_true",
                       help="also write each component as a Hugging Face directory under OUT/components/")
    whole.add_argument("--max-shard-gb", type=float, default=5.0, help="split safetensors above this size")
    whole.add_argument("--tokenizer", default=None,
                       help="tokenizer to ship (default: the run's data.tokenizer); must be the one it trained with")
    whole.add_argument("--allow-nonofficial", action="store_true",
                       help="export a LEO that the official LEO code cannot build (leo_jax.pytorch loads it)")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        if args.command == "import-hf":
            out = import_hf(args.src, args.out, family=args.family, param_dtype=args.param_dtype)
        elif args.command == "export":
            out = export_trained(args.ckpt, args.out, dtype=args.dtype, components=args.components,
                                 max_shard_bytes=int(args.max_shard_gb * 1024**3), tokenizer=args.tokenizer,
                                 allow_nonofficial=args.allow_nonofficial)
        else:
            out = export_hf(args.src, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    except (ConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
