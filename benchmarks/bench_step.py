"""Train-step throughput of a preset's LLM for each `attention_impl`, and of the same model in PyTorch.

The JAX side is the trainer's own jitted step (leo_jax.train: AdamW, loss, donation, shardings on a mesh over all
devices) on random token batches; the LLM of a LEO / LEO-MINI preset is taken alone (the step trains text only, so
no images/s is measured), optionally cut to `--layers` layers so it fits one accelerator. The PyTorch side is the
same architecture as leo_jax.pytorch builds it (InternLM2 written there; Llama / Qwen2 from transformers) with an
AdamW step on the same batch and device kind, in bf16 autocast when the JAX compute dtype is bf16. Compilation and
the first steps are excluded. Prints step time, tokens/s, MFU (model FLOPs of leo_jax.train.metrics over the
device peak, when known) and peak device memory per implementation, then the JAX / PyTorch throughput ratio.

    python -m benchmarks.bench_step --config llama3_8b --layers 8 --batch 1 --seq 8192 --impls xla,auto
    python -m benchmarks.bench_step --quick   # tiny CPU check (xla vs splash in interpret mode)
"""
import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from leo_jax.config import load_config
from leo_jax.layers.attention import attention_kernel
from leo_jax.models.llm.decoder import LLMConfig
from leo_jax.models.registry import build_model
from leo_jax.sharding import build_mesh
from leo_jax.train.config import TrainConfig
from leo_jax.train.metrics import peak_flops_per_device, train_flops_per_step
from leo_jax.train.optimizer import TrainableFilter, count_params, make_optimizer
from leo_jax.train.state import create_train_state
from leo_jax.train.step import jit_train_step, make_train_step

QUICK = dict(config="tiny_llm", layers=1, batch=2, seq=128, steps=2, warmup=1, impls="xla,splash")


def llm_fields(config) -> dict:
    """The LLM section of a preset: `config.model` itself for an LLM preset, `config.model.llm` for LEO models."""
    model = config.model.to_dict()
    if model["kind"] == "llm":
        return {k: v for k, v in model.items() if k != "kind"}
    if "llm" in model:
        return dict(model["llm"])
    raise SystemExit(f"--config: preset's model kind {model['kind']!r} has no LLM; use an LLM, LEO or LEO-MINI preset")


def random_batch(cfg: LLMConfig, batch: int, seq: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(batch, seq + 1)).astype(np.int32)
    return dict(input_ids=ids[:, :-1], labels=ids[:, 1:], loss_mask=np.ones((batch, seq), np.float32),
                segment_ids=np.ones((batch, seq), np.int32),
                positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy())


def peak_memory() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return "n/a" if peak is None else f"{peak / 2**30:.2f} GiB"


def bench_jax(fields: dict, impl: str, batch_np: dict, args) -> float:
    """Seconds per step of the trainer's jitted step with `attention_impl=impl` (printed with its figures)."""
    cfg = LLMConfig(**{**fields, "attention_impl": impl})
    train = TrainConfig.from_config({"steps": args.steps + args.warmup, "learning_rate": 1e-5})
    tx, schedule = make_optimizer(train, train.steps)
    mesh = build_mesh({"ici": {"fsdp": -1, "data": 1}})
    build = lambda rngs: build_model({"kind": "llm", **fields, "attention_impl": impl}, rngs)  # noqa: E731
    filt = TrainableFilter((".*",), ())
    graphdef, state, shardings = create_train_state(build, filt, tx, 0, mesh)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    step = jit_train_step(make_train_step(graphdef, tx, schedule, grad_accum_steps=1, balance_loss_weight=0.0),
                          shardings, {k: v for k, v in batch.items()}, mesh)
    with jax.set_mesh(mesh):
        kernel = attention_kernel(impl, cfg.splash_block).name
        for _ in range(args.warmup):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / args.steps
    b, t = batch_np["input_ids"].shape
    params = count_params(state.trainable)
    flops = train_flops_per_step(cfg, t, b, params)
    peak = peak_flops_per_device(0.0)
    mfu = "n/a (no peak FLOPs for this device)" if peak is None else \
        f"{100 * flops / seconds / (peak * jax.device_count()):.1f}%"
    print(f"jax attention_impl={impl:<6} ({kernel:<6}) step {seconds:8.4f} s  {b * t / seconds:10.1f} tokens/s  "
          f"images/s n/a (text-only step)  MFU {mfu}  peak memory {peak_memory()}")
    return seconds


def bench_torch(fields: dict, batch_np: dict, args) -> float | None:
    """Seconds per step of the PyTorch model (AdamW, cross-entropy) on the same batch; None without torch."""
    try:
        import torch
    except ImportError:
        print("pytorch: not installed, no ratio")
        return None
    from leo_jax.convert.llm import _llm_config_to_hf as llm_config_to_hf
    from leo_jax.pytorch.leo import build_language_model

    cfg = LLMConfig(**fields)
    platform = jax.devices()[0].platform
    device = "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"
    model = build_language_model(llm_config_to_hf(cfg, {})).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.from_numpy(batch_np["input_ids"]).long().to(device)
    labels = torch.from_numpy(batch_np["labels"]).long().to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    def step():
        with autocast:
            out = model(input_ids=ids)
            logits = out if torch.is_tensor(out) else out.logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    b, t = ids.shape
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else "n/a"
    print(f"pytorch {type(model).__name__} on {device}: step {seconds:8.4f} s  {b * t / seconds:10.1f} tokens/s  "
          f"peak memory {memory}")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama3_8b", help="LLM, LEO or LEO-MINI preset (its LLM is benchmarked)")
    parser.add_argument("--layers", type=int, default=0, help="cut the LLM to this many layers (0 = all)")
    parser.add_argument("--batch", type=int, default=1, help="rows per step (global)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--impls", default="xla,auto", help="comma-separated attention_impl values")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--quick", action="store_true", help=f"tiny CPU check: {QUICK}")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    fields = llm_fields(load_config(args.config))
    if args.layers:
        fields["num_layers"] = args.layers
    if args.quick:
        fields.update(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, vocab_size=256,
                      dtype="float32")
    cfg = LLMConfig(**fields)
    if args.seq > cfg.max_position_embeddings:
        fields["max_position_embeddings"] = args.seq
    print(f"{args.config}: LLM {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads "
          f"({cfg.num_kv_heads} KV), {cfg.dtype}; batch {args.batch} x {args.seq} tokens; "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    if args.batch % jax.device_count():
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {jax.device_count()} devices (the batch is "
                         "split over all of them)")
    batch = random_batch(cfg, args.batch, args.seq)
    times = {impl: bench_jax(fields, impl, batch, args) for impl in args.impls.split(",")}
    torch_seconds = None if args.no_torch else bench_torch(fields, batch, args)
    if torch_seconds is not None:
        for impl, seconds in times.items():
            print(f"ratio jax attention_impl={impl} / pytorch throughput: {torch_seconds / seconds:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
