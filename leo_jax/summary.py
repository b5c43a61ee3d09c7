"""Parameter counts per module (and FLOPs where the model defines them) for a preset, without allocating weights.

    python -m leo_jax.summary --config llama3_8b [--depth 2] [--seq-len 2048] [--config.model.num_layers=40]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from flax import nnx

from leo_jax.config import parse_cli
from leo_jax.models.registry import abstract_model, model_config


def parameter_counts(module: nnx.Module, depth: int) -> dict[str, int]:
    """{module path truncated to `depth` components: number of parameters} from an (abstract) module."""
    counts: dict[str, int] = defaultdict(int)
    for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        counts["/".join(map(str, path[:depth]))] += int(variable.get_value().size)
    return dict(counts)


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def summarize(config, depth: int = 2, seq_len: int = 2048) -> str:
    cfg = model_config(config.model)
    model = abstract_model(config.model)
    counts = parameter_counts(model, depth)
    total = sum(counts.values())
    width = max(len(k) for k in counts) + 2
    lines = [f"model kind: {config.model.kind} ({type(cfg).__name__})", f"{'module':<{width}}{'params':>16}  share"]
    for name, n in sorted(counts.items()):
        lines.append(f"{name:<{width}}{n:>16,}  {100 * n / total:5.1f}%")
    lines.append(f"{'total':<{width}}{total:>16,}  ({human(total)})")
    if hasattr(cfg, "visual_tokens_per_image"):
        lines.append(f"visual tokens per image: {cfg.visual_tokens_per_image()}")
    if hasattr(cfg, "forward_flops"):
        flops = cfg.forward_flops(seq_len)
        lines.append(f"forward FLOPs per sample at {seq_len} tokens: {flops:.4g} ({human(flops)}FLOPs); "
                     f"training step ~3x: {human(3 * flops)}FLOPs")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="preset name (a leo_jax/configs file) or path, optional ':arg'")
    parser.add_argument("--depth", type=int, default=2, help="module path depth of the breakdown")
    parser.add_argument("--seq-len", type=int, default=2048, help="prompt length for the FLOPs estimate")
    config, args = parse_cli(parser, sys.argv[1:] if argv is None else argv)
    try:
        print(summarize(config, args.depth, args.seq_len))
    except ValueError as e:  # config validation: names the bad field
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
