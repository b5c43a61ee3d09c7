"""`python -m leo_jax.aot --config <preset> --topology v5p-128`: compiles the real train step ahead of time for a
TPU topology on this (CPU) machine and prints per-chip memory and XLA's cost estimates.

Needs `jax[tpu]` (libtpu) of the same jax version, best in a separate environment:
    python -m venv /work/tpu-venv && /work/tpu-venv/bin/pip install "jax[tpu]==0.10.2" <the other requirements>
No TPU is used: `jax.experimental.topologies` describes the slice, the state and batch are abstract (nothing is
allocated) and the step is lowered with the trainer's own shardings, donation and micro-batching.

Step-time estimates: XLA's cost analysis gives FLOPs and HBM bytes per chip, turned into a roofline time
max(FLOPs / peak, bytes / HBM bandwidth); XLA counts the body of a while loop once, so with the layers under
lax.scan this is a lower bound. The model-FLOPs estimate (leo_jax.train.metrics' formula over the chips, at peak and
at 50% / 40% MFU) is the one to plan with. Collectives and their overlap are not modelled by either.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

# Chips and ICI shape per slice size (TensorCores for v4/v5p names, chips for v5e/v6e names), as Cloud TPU defines.
_CUBE = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8",
         1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_TORUS = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# HBM bandwidth per chip (bytes/s), data sheets.
HBM_BANDWIDTH = {"TPU v4": 1.2e12, "TPU v5 lite": 0.82e12, "TPU v5": 2.76e12, "TPU v6 lite": 1.64e12}
HBM_BYTES = {"TPU v4": 32e9, "TPU v5 lite": 16e9, "TPU v5": 95e9, "TPU v6 lite": 32e9}


def topology_name(name: str) -> tuple[str, str]:
    """'v5p-128' -> ('v5p:4x4x4', 'megacore'); 'v5e-64' -> ('v5e:8x8', 'default'); 'v5p:4x4x4' passes through."""
    match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
    if match:
        family, size = match.group(1), int(match.group(2))
        table, chips = (_CUBE, size // 2) if family in ("v4", "v5p") else (_TORUS, size)
        if chips not in table:
            raise ValueError(f"--topology {name}: unknown slice size; known: {[f'{family}-{c}' for c in table]}")
        name = f"{family}:{table[chips]}"
    if not re.fullmatch(r"(v4|v5p|v5e|v6e):\d+(x\d+)+", name):
        raise ValueError(f"--topology {name!r}: use e.g. v5p-128, v5e-64, v6e-256 or v5p:4x4x4")
    return name, "megacore" if name.startswith(("v4", "v5p")) else "default"


def batch_shapes(config, kind, batch_shards: int = 1, grad_accum_steps: int = 1):
    """ShapeDtypeStructs of one global batch (the data contract) for the model's data-side kind
    (leo_jax.data.visual) and the data config, without reading data; with a visual budget (data.visual_budget) its
    `visual_index` for `batch_shards` device blocks of the batch axis and `grad_accum_steps` micro-batches."""
    import jax
    import numpy as np


    data = config.data
    b, t = int(data.global_batch_size), int(data.seq_len)
    shapes = {"input_ids": ((b, t), np.int32), "labels": ((b, t), np.int32), "loss_mask": ((b, t), np.float32),
              "segment_ids": ((b, t), np.int32), "positions": ((b, t), np.int32), "prompt_mask": ((b, t), np.bool_)}
    setup = kind.setup(kind.preprocessors())
    if setup.capacity:
        k = setup.capacity
        shapes[setup.mask_key] = ((b, k), np.bool_)
        shapes[setup.mask_key.replace("_mask", "_segment_ids")] = ((b, k), np.int32)
        for key, (item, dtype) in setup.specs.items():
            shapes[key] = ((b, k, *item), dtype)
        from leo_jax.data.pipeline import visual_budget_groups

        groups, per_group = visual_budget_groups(kind.budget, b, 1, batch_shards, grad_accum_steps)
        if per_group > 0:
            shapes["visual_index"] = ((groups, per_group), np.int32)
    return {key: jax.ShapeDtypeStruct(shape, dtype) for key, (shape, dtype) in shapes.items()}


def compile_train_step(config, devices):
    """Lowers and compiles the trainer's jitted step for `devices`; returns (compiled, seconds, trainer pieces)."""
    import jax
    from flax import nnx

    from leo_jax.data import visual
    from leo_jax.models.registry import build_model, model_config
    from leo_jax.sharding import batch_shards, build_mesh
    from leo_jax.train.config import TrainConfig
    from leo_jax.train.optimizer import TrainableFilter, check_patterns, count_params, make_optimizer
    from leo_jax.train.state import abstract_train_state, with_shardings
    from leo_jax.train.step import batch_shardings, jit_train_step, make_train_step

    if "image_context_id" in config.model and config.model.image_context_id < 0:
        config.model.image_context_id = 0  # any id: the tokenizer is not needed to compile
    train = TrainConfig.from_config(config.train)
    steps = train.steps if train.steps > 0 else 1000
    tx, schedule = make_optimizer(train, steps)
    filt = TrainableFilter(train.trainable, train.frozen)
    build = lambda rngs: build_model(config.model, rngs)  # noqa: E731
    check_patterns(nnx.eval_shape(lambda: build(nnx.Rngs(0))), train)
    mesh = build_mesh(config.mesh, devices=devices)
    graphdef, abstract, shardings = abstract_train_state(build, filt, tx, int(config.seed), mesh)
    batch = batch_shapes(config, visual.for_model(model_config(config.model), config.data), batch_shards(mesh),
                         train.grad_accum_steps)
    step = make_train_step(graphdef, tx, schedule, grad_accum_steps=train.grad_accum_steps,
                           balance_loss_weight=train.balance_loss_weight)
    jitted = jit_train_step(step, shardings, batch, mesh)
    batch = with_shardings(batch, batch_shardings(batch, mesh))
    started = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jitted.lower(abstract, batch).compile()
    info = {"mesh": dict(mesh.shape), "trainable": count_params(abstract.trainable),
            "frozen": count_params(abstract.frozen), "model_cfg": model_config(config.model)}
    return compiled, time.perf_counter() - started, info


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m leo_jax.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training preset (with a `train` section)")
    parser.add_argument("--topology", required=True, help="TPU slice, e.g. v5p-128, v5e-256, v6e-64 or v5p:4x4x4")
    parser.add_argument("--num-slices", type=int, default=1)
    from leo_jax.config import config_name, parse_cli

    config, args = parse_cli(parser, argv)
    try:
        name, chip_config = topology_name(args.topology)
    except ValueError as e:
        parser.error(str(e))
    if "train" not in config:
        parser.error(f"--config {args.config}: no `train` section; use a training preset (e.g. leo_8b_sft)")

    from jax.experimental import topologies

    from leo_jax.train.metrics import peak_flops_per_device, train_flops_per_step

    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name=chip_config,
                                                chips_per_host_bounds=(2, 2, 1), num_slices=args.num_slices)
    except Exception as e:  # noqa: BLE001 - libtpu missing or unknown topology: say which
        print(f"error: cannot describe TPU topology {name!r} ({type(e).__name__}: {e}). Is jax[tpu] (libtpu) "
              "installed in this environment?", file=sys.stderr)
        return 2
    devices = topology.devices
    kind = devices[0].device_kind
    print(f"topology {args.topology} -> {name}: {len(devices)} devices ({kind}); preset {config_name(argv)}")
    compiled, seconds, info = compile_train_step(config, devices)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gib = 1024**3
    per_chip = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes - \
        memory.alias_size_in_bytes
    hbm = next((v for k, v in HBM_BYTES.items() if kind == k), None)
    print(f"compiled in {seconds:.0f} s; mesh {info['mesh']}; parameters {info['trainable']:,} trainable + "
          f"{info['frozen']:,} frozen; global batch {config.data.global_batch_size} x {config.data.seq_len} tokens")
    print(f"per-chip memory: arguments {memory.argument_size_in_bytes / gib:.2f} GiB, outputs "
          f"{memory.output_size_in_bytes / gib:.2f} GiB (aliased/donated {memory.alias_size_in_bytes / gib:.2f} GiB), "
          f"temporaries {memory.temp_size_in_bytes / gib:.2f} GiB -> peak ~{per_chip / gib:.2f} GiB"
          + (f" of {hbm / 1e9:.0f} GB HBM" if hbm else ""))
    flops, bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    peak = peak_flops_per_device(0.0, kind)
    bandwidth = next((v for k, v in HBM_BANDWIDTH.items() if kind == k), None)
    print(f"XLA cost analysis per chip: {flops / 1e12:.2f} TFLOP, {bytes_accessed / 1e9:.1f} GB accessed -> roofline "
          f"{max(flops / peak, bytes_accessed / bandwidth):.3f} s (XLA counts a while loop's body once: the scanned "
          "layer stacks are counted as one layer each, so this is a lower bound)")
    model_flops = train_flops_per_step(info["model_cfg"], int(config.data.seq_len),
                                       int(config.data.global_batch_size), info["trainable"] + info["frozen"])
    at_peak = model_flops / len(devices) / peak
    print(f"model FLOPs per step {model_flops / 1e15:.1f} PFLOP ({model_flops / len(devices) / 1e12:.0f} TFLOP per "
          f"chip; leo_jax.train.metrics formula, remat recompute not counted) -> estimated step time "
          f"{at_peak:.2f} s at peak, {at_peak / 0.5:.2f} s at 50% MFU, {at_peak / 0.4:.2f} s at 40% MFU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
