"""Train step with a visual budget vs every slot, on a batch where about half the rows are text-only.

The batch comes from the real pipeline over the synthetic set (written to a temporary directory with the given
text-only fraction, one image per image sample, one tile / image slot per row) with `data.visual_budget` = half the
slots; the every-slot run takes the same batch without `visual_index`, so both do the same useful work and differ
only in the encoder work on empty slots. For each preset: XLA's FLOP count of the compiled train step (the trainer's
jitted step on one device) for both, then step times measured in interleaved repeats (budget, every slot, budget,
...), printed as medians with the spread.

    python -m benchmarks.bench_visual_budget                      # tiny LEO and tiny LEO-MINI, 8 rows
    python -m benchmarks.bench_visual_budget --presets tiny_leo_train --batch 16 --repeats 7
"""
import argparse
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from leo_jax.config import load_config
from leo_jax.data import pipeline, synthetic, visual
from leo_jax.models.registry import build_model
from leo_jax.sharding import build_mesh
from leo_jax.train.config import TrainConfig
from leo_jax.train.optimizer import TrainableFilter, make_optimizer
from leo_jax.train.state import create_train_state
from leo_jax.train.step import device_batch, jit_train_step, make_train_step


def budget_batch(preset: str, data_dir: str, rows: int) -> tuple[dict, object]:
    """(the first pipeline batch of `rows` rows with a budget of half the slots, config)."""
    config = load_config(preset)
    config.data.update(train_files=f"{data_dir}/data.json", global_batch_size=rows, shuffle=False,
                       visual_budget=rows // 2)
    config.data.leo.update(max_images_per_sample=1, jpeg_augment=False)  # one slot per row
    config.data.leo_mini.max_images_per_row = 1
    iterator = pipeline.make_train_iterator(config.data, visual.for_config(config), process_index=0,
                                            process_count=1)
    return device_batch(next(iterator)), config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_visual_budget",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny_leo_train,tiny_leo_mini_train")
    parser.add_argument("--batch", type=int, default=8, help="rows per step (even)")
    parser.add_argument("--text-only", type=float, default=0.5, help="fraction of text-only samples in the data")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    args = parser.parse_args(argv)
    if args.batch % 2:
        parser.error("--batch must be even (the budget is half the slots)")
    print(f"devices: {jax.devices()[0].device_kind} (1 used); rows {args.batch}; text-only fraction "
          f"{args.text_only}")
    with tempfile.TemporaryDirectory() as data_dir:
        synthetic.write_dataset(data_dir, 4 * args.batch, seed=0, val_num=1, multi_turn_fraction=0.0,
                                multi_image_fraction=0.0, text_only_fraction=args.text_only)
        for preset in args.presets.split(","):
            batch_np, config = budget_batch(preset, data_dir, args.batch)
            mask = batch_np["tile_mask" if "tile_mask" in batch_np else "image_mask"]
            train = TrainConfig.from_config(config.train)
            tx, schedule = make_optimizer(train, 1000)
            mesh = build_mesh({"ici": {"data": 1}}, devices=jax.devices()[:1])
            graphdef, state, shardings = create_train_state(lambda rngs: build_model(config.model, rngs),
                                                            TrainableFilter(train.trainable, train.frozen), tx, 0,
                                                            mesh)
            step_fn = make_train_step(graphdef, tx, schedule, grad_accum_steps=1,
                                      balance_loss_weight=train.balance_loss_weight)
            batches = {"budget": {k: jnp.asarray(v) for k, v in batch_np.items()}}
            batches["every slot"] = {k: v for k, v in batches["budget"].items() if k != "visual_index"}
            steps, flops = {}, {}
            with jax.set_mesh(mesh):
                for name, batch in batches.items():
                    jitted = jit_train_step(step_fn, shardings, batch, mesh)
                    compiled = jitted.lower(state, batch).compile()
                    cost = compiled.cost_analysis()
                    flops[name] = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
                    steps[name] = jitted
                    state, metrics = jitted(state, batch)  # warm-up
                    jax.block_until_ready(metrics)
                times = {name: [] for name in batches}
                for _ in range(args.repeats):
                    for name, batch in batches.items():
                        start = time.perf_counter()
                        for _ in range(args.steps):
                            state, metrics = steps[name](state, batch)
                        jax.block_until_ready(metrics)
                        times[name].append((time.perf_counter() - start) / args.steps)
            print(f"{preset}: {int(mask.sum())} real of {mask.size} slots, budget {batch_np['visual_index'].size}")
            for name in batches:
                t = sorted(times[name])
                print(f"  {name:<10} XLA train-step FLOPs {flops[name] / 1e9:8.3f} GFLOP   step median "
                      f"{1e3 * statistics.median(t):8.1f} ms (min {1e3 * t[0]:.1f}, max {1e3 * t[-1]:.1f}; "
                      f"{args.repeats} x {args.steps} steps)")
            ratio = statistics.median(times["budget"]) / statistics.median(times["every slot"])
            print(f"  budget / every slot: FLOPs {flops['budget'] / flops['every slot']:.3f}, step time "
                  f"{ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
