"""Parameter counts per module (and FLOPs where the model defines them) for a preset, without allocating weights;
with `--compare`, FLOPs per sample of several presets at the same text length and images.

    python -m leo_jax.summary --config llama3_8b [--depth 2] [--text-tokens 2048] [--config.model.num_layers=40]
    python -m leo_jax.summary --config leo_8b --compare leo_mini_llama3_8b --tiles 7 --images 1 --text-tokens 512

A LEO sample reads `--tiles` tiles (of all its images), a LEO-MINI sample `--images` images; the LLM then reads the
text tokens plus the visual tokens of those tiles / images.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from flax import nnx

from leo_jax.config import config_name, load_config, parse_cli
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


def visual_counts(tiles: float, images: float) -> dict[str, float]:
    """The count each model kind's FLOPs take (its config's `visual_count`)."""
    return {"tiles": tiles, "images": images}


def sample_flops(cfg, text_tokens: int, counts: dict[str, float]) -> tuple[float, float, float]:
    """(visual tokens, LLM tokens, forward FLOPs) of one sample of `text_tokens` text tokens and the tiles / images
    in `counts`; a model without images reads the text only."""
    unit = getattr(cfg, "visual_count", None)
    if unit is None:
        return 0.0, float(text_tokens), float(cfg.forward_flops(text_tokens))
    visual = cfg.visual_tokens(counts[unit])
    return visual, text_tokens + visual, float(cfg.forward_flops(int(text_tokens + visual), counts[unit]))


def summarize(config, depth: int = 2, text_tokens: int = 2048, tiles: float = 7, images: float = 1) -> str:
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
        unit = getattr(cfg, "visual_count", None)
        visual, llm_tokens, flops = sample_flops(cfg, text_tokens, visual_counts(tiles, images))
        what = f"{text_tokens} text tokens" + (f" + {visual_counts(tiles, images)[unit]:g} {unit} ({visual:g} "
                                                f"visual tokens) = {llm_tokens:g} LLM tokens" if unit else "")
        lines.append(f"forward FLOPs per sample at {what}: {flops:.4g} ({human(flops)}FLOPs); "
                     f"training step ~3x: {human(3 * flops)}FLOPs")
    return "\n".join(lines)


def compare(names: list[str], configs: list, text_tokens: int, tiles: float, images: float) -> str:
    """One line per preset: visual tokens, LLM tokens and forward FLOPs per sample at the same text length and
    tiles / images, and the FLOPs ratio to the first preset."""
    counts = visual_counts(tiles, images)
    rows = []
    for name, config in zip(names, configs):
        cfg = model_config(config.model)
        unit = getattr(cfg, "visual_count", None)
        shown = f"{counts[unit]:g} {unit}" if unit else "text only"
        rows.append((name, shown, *sample_flops(cfg, text_tokens, counts)))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"per sample at {text_tokens} text tokens, {tiles:g} tiles (LEO) / {images:g} images (LEO-MINI):",
             f"{'preset':<{width}}{'images':>10}{'visual tokens':>15}{'LLM tokens':>12}{'forward FLOPs':>16}"
             f"{'ratio':>8}"]
    for name, shown, visual, llm_tokens, flops in rows:
        lines.append(f"{name:<{width}}{shown:>10}{visual:>15,.0f}{llm_tokens:>12,.0f}{human(flops) + 'FLOPs':>16}"
                     f"{flops / rows[0][4]:>8.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="preset name (a leo_jax/configs file) or path, optional ':arg'")
    parser.add_argument("--depth", type=int, default=2, help="module path depth of the breakdown")
    parser.add_argument("--text-tokens", type=int, default=2048,
                        help="text tokens per sample (the LLM reads them plus the visual tokens)")
    parser.add_argument("--tiles", type=float, default=7, help="tiles per LEO sample (all its images; 1..7 per image)")
    parser.add_argument("--images", type=float, default=1, help="images per LEO-MINI sample")
    parser.add_argument("--compare", action="append", default=[], metavar="PRESET",
                        help="also a preset to compare FLOPs per sample with (repeatable)")
    argv = list(sys.argv[1:] if argv is None else argv)
    config, args = parse_cli(parser, argv)
    for flag, value in (("--text-tokens", args.text_tokens), ("--tiles", args.tiles), ("--images", args.images)):
        if value < 0:
            parser.error(f"{flag}={value:g}: must be >= 0")
    try:
        print(summarize(config, args.depth, args.text_tokens, args.tiles, args.images))
        if args.compare:
            others = []
            for name in args.compare:
                preset, _, arg = name.partition(":")
                try:
                    others.append(load_config(preset, (), arg or None))
                except FileNotFoundError as e:
                    parser.error(f"--compare {name}: {e}")
            print(compare([config_name(argv), *args.compare], [config, *others], args.text_tokens, args.tiles,
                          args.images))
    except ValueError as e:  # config validation: names the bad field
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
