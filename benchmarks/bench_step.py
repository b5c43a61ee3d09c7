"""Train-step throughput of a preset for each `attention_impl`, and of the same model in PyTorch.

The JAX side is the trainer's own jitted step (leo_jax.train: AdamW, loss, balance loss, donation, shardings on a
mesh over all devices) on a random batch in the data contract of the preset's model kind: text rows for an LLM;
for LEO-MINI / LEO every image slot filled (images or tiles) with the matching <IMG_CONTEXT> runs in the prompt, so
the whole multimodal step (vision encoders, CoTR / projectors, LLM) runs. `--layers N` cuts the LLM to N layers so a
model fits one accelerator. `attention_impl` is set on the LLM and every encoder that has one. The PyTorch side is
the same model as leo_jax.pytorch builds it from the export config (LEO-MINI: LeoMiniForCausalLM; an LLM: InternLM2
written there, Llama / Qwen2 from transformers) with an AdamW step on the same batch and device kind, in bf16
autocast when the JAX compute dtype is bf16. Both sides train every parameter (the same work whatever the stage's
freezing) except the experts named in --freeze-experts. Compilation and the first steps are excluded; --rounds
alternates the sides and reports each one's median round. Prints step time, tokens/s, images/s, MFU (model FLOPs of
leo_jax.train.metrics for the batch's images over the device peak, when known), peak device memory and the
temporaries per call per implementation, the host page faults per step on CPU, then the JAX / PyTorch throughput
ratio. The process runs with the train CLI's CPU settings (leo_jax.train.cpu_process), which the PyTorch side shares
(`--cpu-process default` for JAX's and glibc's defaults).

    python -m benchmarks.bench_step --config leo_mini_llama3_8b_stage2 --layers 8 --batch 8 --impls xla,auto
    python -m benchmarks.bench_step --config llama3_8b --layers 8 --batch 1 --seq 8192 --impls xla,auto
    python -m benchmarks.bench_step --quick   # tiny CPU check: tiny LEO-MINI, xla vs splash in interpret mode
    python -m benchmarks.bench_step --config tiny_leo_mini_train --batch 16 --seq 96 --impls xla \
        --freeze-experts convnext --steps 3 --rounds 8   # the main command's step, JAX vs PyTorch on CPU
    python -m benchmarks.bench_step --config tiny_leo_mini_train --config.model.llm.num_layers=4 \
        --config.model.llm.hidden_size=256 --config.model.llm.intermediate_size=512 --batch 16 --seq 96 --impls xla
    python -m benchmarks.bench_step --config tiny_leo_mini_train --batch 16 --seq 96 --impls xla --steps 3 \
        --rounds 5 --cpu-scheduler CPU_SCHEDULER_TYPE_DEFAULT   # the trainer's CPU scheduler vs XLA:CPU's default
    python -m benchmarks.bench_step --config tiny_leo_mini_train --batch 16 --seq 96 --impls xla --steps 3 \
        --rounds 5 --cpu-process default   # without the train CLI's CPU process settings (both sides)
"""
import argparse
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from leo_jax.aot import batch_shapes
from leo_jax.config import config_name, parse_cli
from leo_jax.data import visual
from leo_jax.layers.attention import attention_kernel
from leo_jax.models.registry import build_model, model_config
from leo_jax.sharding import build_mesh
from leo_jax.train import cpu_process
from leo_jax.train.config import TrainConfig
from leo_jax.train.metrics import peak_flops_per_device, train_flops_per_step
from leo_jax.train.optimizer import TrainableFilter, count_params, make_optimizer
from leo_jax.train.state import create_train_state
from leo_jax.train.step import jit_train_step, make_train_step

QUICK = dict(config="tiny_leo_mini_train", layers=1, batch=2, seq=96, steps=2, warmup=1, impls="xla,splash")


def llm_of(model: dict) -> dict:
    """The LLM fields of a model config dict: the dict itself for an LLM, its `llm` entry for LEO models."""
    return model if model["kind"] == "llm" else model["llm"]


def with_impl(node, impl: str):
    """The model config dict with `attention_impl` set to `impl` wherever a (sub)config has that field."""
    if isinstance(node, dict):
        return {k: impl if k == "attention_impl" else with_impl(v, impl) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(with_impl(v, impl) for v in node)
    return node


def random_batch(config, model_fields: dict, batch: int, seq: int) -> tuple[dict, int]:
    """(numpy batch, images or tiles in it) in the data contract of the model's kind, every image slot real: each row
    starts with its <IMG_CONTEXT> runs, then random text; the first half of the text is prompt, the rest answer."""
    cfg = model_config(model_fields)
    rng = np.random.default_rng(0)
    out, slots, visual_tokens = {}, 0, 0
    context = int(model_fields.get("image_context_id", -1))
    if hasattr(cfg, "visual_count"):  # the image side of the data contract (masks, pixels / tiles / patches)
        config.data.update(global_batch_size=batch, seq_len=seq)
        shapes = batch_shapes(config, visual.for_model(cfg, config.data))
        for key, spec in shapes.items():
            if spec.dtype == np.uint8:
                out[key] = rng.integers(0, 256, spec.shape, dtype=np.uint8)
            elif np.issubdtype(spec.dtype, np.floating):
                out[key] = rng.standard_normal(spec.shape).astype(spec.dtype)
            else:
                out[key] = np.ones(spec.shape, spec.dtype)
        slots = shapes["image_mask" if "image_mask" in shapes else "tile_mask"].shape[1]
        visual_tokens = int(cfg.visual_tokens(slots))
    if visual_tokens + 2 > seq:
        raise SystemExit(f"--seq {seq}: a row needs more than its {visual_tokens} visual tokens ({slots} "
                         f"{getattr(cfg, 'visual_count', 'images')}); raise --seq")
    ids = rng.integers(3, llm_of(model_fields)["vocab_size"], size=(batch, seq + 1)).astype(np.int32)
    ids[ids == context] = 3
    ids[:, 1:1 + visual_tokens] = context
    prompt = np.zeros((batch, seq), bool)
    prompt[:, :visual_tokens + 1 + (seq - visual_tokens) // 2] = True
    out.update(input_ids=ids[:, :-1], labels=ids[:, 1:], loss_mask=(~prompt).astype(np.float32), prompt_mask=prompt,
               segment_ids=np.ones((batch, seq), np.int32),
               positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy())
    return out, batch * slots


def minor_page_faults() -> int:
    """This process's minor page faults so far: pages the kernel mapped in on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_memory() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return "n/a" if peak is None else f"{peak / 2**30:.2f} GiB"


class JaxStep:
    """The trainer's jitted step with `attention_impl=impl`, compiled and warmed up; `run(n)` times n steps."""

    def __init__(self, config, impl: str, batch_np: dict, images: int, args, cpu_scheduler: str | None = None):
        """`cpu_scheduler`: an XLA:CPU scheduler type to compile with instead of the trainer's options."""
        self.impl, self.images, self.batch_np = impl, images, batch_np
        self.label = impl if cpu_scheduler is None else f"{impl} with {cpu_scheduler}"
        fields = with_impl(config.model.to_dict(), impl)
        self.cfg = model_config(fields)
        train = TrainConfig.from_config({"steps": 1000, "learning_rate": 1e-5})
        tx, schedule = make_optimizer(train, train.steps)
        self.mesh = build_mesh({"ici": {"fsdp": -1, "data": 1}})
        frozen = tuple(f"experts/{name}/.*" for name in args.freeze_experts)
        graphdef, self.state, shardings = create_train_state(lambda rngs: build_model(fields, rngs),
                                                             TrainableFilter((".*",), frozen), tx, 0, self.mesh)
        self.batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
        weight = float(config.train.get("balance_loss_weight", 0.0)) if "train" in config else 0.0
        jitted = jit_train_step(make_train_step(graphdef, tx, schedule, grad_accum_steps=1,
                                                balance_loss_weight=weight), shardings, self.batch, self.mesh)
        options = None if cpu_scheduler is None else {"xla_cpu_scheduler_type": cpu_scheduler}
        with jax.set_mesh(self.mesh):
            self.step = jitted.lower(self.state, self.batch).compile(compiler_options=options)
        memory = self.step.memory_analysis()
        self.temporaries = None if memory is None else memory.temp_size_in_bytes
        self.kernel = attention_kernel(impl, llm_of(fields).get("splash_block", 512)).name
        self.run(args.warmup)

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        with jax.set_mesh(self.mesh):
            start = time.perf_counter()
            for _ in range(steps):
                self.state, self.metrics = self.step(self.state, self.batch)
            jax.block_until_ready(self.metrics)
        if int(self.metrics.get("visual_token_mismatch", 0)):
            raise SystemExit("bench batch: <IMG_CONTEXT> runs and image slots disagree (a bug in random_batch)")
        return (time.perf_counter() - start) / max(steps, 1)

    def report(self, seconds: float) -> None:
        b, t = self.batch_np["input_ids"].shape
        unit = getattr(self.cfg, "visual_count", None)
        params = count_params(self.state.trainable) + count_params(self.state.frozen)
        flops = train_flops_per_step(self.cfg, t, b, params, {unit: self.images} if unit else None)
        peak = peak_flops_per_device(0.0)
        mfu = "n/a (no peak FLOPs for this device)" if peak is None else \
            f"{100 * flops / seconds / (peak * jax.device_count()):.1f}%"
        per_second = f"{self.images / seconds:8.2f} {unit}/s" if unit else "images/s n/a (text-only model)"
        temporaries = "n/a" if self.temporaries is None else f"{self.temporaries / 2**20:.1f} MiB"
        print(f"jax attention_impl={self.label:<6} ({self.kernel:<6}) step {seconds:8.4f} s  {b * t / seconds:10.1f} "
              f"tokens/s  {per_second}  MFU {mfu}  peak memory {peak_memory()}  temporaries per call {temporaries}")


def torch_model_and_inputs(config, batch_np: dict):
    """(PyTorch model built from the export config, forward kwargs, labels) for the batch; LLMs and LEO-MINI."""
    import torch

    cfg = model_config(config.model.to_dict())
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    ids = t(batch_np["input_ids"]).long()
    labels = t(batch_np["labels"]).long().masked_fill(~t(batch_np["loss_mask"] > 0), -100)
    if config.model.kind == "llm":
        from leo_jax.convert.llm import _llm_config_to_hf as llm_config_to_hf
        from leo_jax.pytorch.leo import build_language_model
        return build_language_model(llm_config_to_hf(cfg, {})), dict(input_ids=ids), labels
    if config.model.kind == "leo_mini":
        from leo_jax.convert.leo_mini import config_to_hf
        from leo_jax.models.leo_mini import PATCH_INPUT_KINDS, expert_pixels
        from leo_jax.pytorch.leo_mini import LeoMiniForCausalLM

        images, patch_masks = {}, {}
        for spec in cfg.experts:  # the encoders' inputs, preprocessed once outside the timed steps
            x = batch_np[spec.batch_key]
            if spec.kind in PATCH_INPUT_KINDS:
                images[spec.name], patch_masks[spec.name] = t(x), t(batch_np[f"patch_mask_{spec.name}"])
            else:
                images[spec.name] = t(expert_pixels(spec, x)).permute(0, 1, 4, 2, 3)
        inputs = dict(input_ids=ids, images=images, patch_masks=patch_masks,
                      attention_mask=t(batch_np["segment_ids"] > 0), prompt_mask=t(batch_np["prompt_mask"]),
                      image_mask=t(batch_np["image_mask"]))
        return LeoMiniForCausalLM(config_to_hf(cfg, {})), inputs, labels
    raise SystemExit(f"--config: no PyTorch training step for model kind {config.model.kind!r} here (LLM and "
                     "LEO-MINI); use --no-torch")


class TorchStep:
    """The PyTorch model (AdamW, cross-entropy [+ balance loss]) on the same batch, warmed up; `run(n)` times n
    steps. `None` from `create` without torch."""

    @classmethod
    def create(cls, config, batch_np: dict, images: int, args):
        try:
            import torch  # noqa: F401
        except ImportError:
            print("pytorch: not installed, no ratio")
            return None
        return cls(config, batch_np, images, args)

    def __init__(self, config, batch_np: dict, images: int, args):
        import torch

        self.torch, self.images = torch, images
        model, inputs, labels = torch_model_and_inputs(config, batch_np)
        platform = jax.devices()[0].platform
        self.device = device = "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"
        move = lambda v: {k: move(x) for k, x in v.items()} if isinstance(v, dict) else v.to(device)  # noqa: E731
        self.model, self.inputs, self.labels = model.to(device).train(), move(inputs), labels.to(device)
        for name, p in self.model.named_parameters():  # the JAX side's experts/<name>/.* patterns
            if any(name.startswith(f"vision_experts.{expert}.") for expert in args.freeze_experts):
                p.requires_grad_(False)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        bf16 = llm_of(config.model.to_dict()).get("dtype", "bfloat16") == "bfloat16"
        self.autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
        self.weight = float(config.train.get("balance_loss_weight", 0.0)) if "train" in config else 0.0
        self.run(args.warmup)

    def _step(self):
        torch = self.torch
        with self.autocast:
            out = self.model(**self.inputs)
            logits = out if torch.is_tensor(out) else out.logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.labels.flatten(),
                                                     ignore_index=-100)
            if self.weight and hasattr(self.model, "balance_loss"):
                loss = loss + self.weight * self.model.balance_loss(self.inputs["attention_mask"])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run(self, steps: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self._step()
        self.sync()
        return (time.perf_counter() - start) / max(steps, 1)

    def report(self, seconds: float) -> None:
        b, t = self.labels.shape
        memory = f"{self.torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if self.device == "cuda" else "n/a"
        per_second = f"  {self.images / seconds:8.2f} images/s" if self.images else ""
        print(f"pytorch {type(self.model).__name__} on {self.device}: step {seconds:8.4f} s  {b * t / seconds:10.1f} "
              f"tokens/s{per_second}  peak memory {memory}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama3_8b",
                        help="LLM, LEO-MINI or LEO preset (a training stage or a model); --config.x=v overrides")
    parser.add_argument("--layers", type=int, default=0, help="cut the LLM to this many layers (0 = all)")
    parser.add_argument("--batch", type=int, default=1, help="rows per step (global)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row (visual tokens included)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--impls", default="xla,auto", help="comma-separated attention_impl values")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--freeze-experts", default="", type=lambda v: [x for x in v.split(",") if x],
                        help="comma-separated vision experts to freeze on both sides (as the LEO-MINI recipes and "
                             "tiny_leo_mini_train freeze ConvNeXt): no weight gradients for them")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the implementations and PyTorch this many times (--steps each) and report "
                             "each one's median round: fairer on a machine whose speed drifts")
    parser.add_argument("--cpu-scheduler", default="",
                        help="also time each implementation compiled with this XLA:CPU scheduler type instead of the "
                             "trainer's (leo_jax.train.step.CPU_COMPILER_OPTIONS), e.g. CPU_SCHEDULER_TYPE_DEFAULT")
    parser.add_argument("--cpu-process", choices=("trainer", "default"), default="trainer",
                        help="trainer: this process runs with the train CLI's CPU settings (leo_jax.train.cpu_process: "
                             "computations inline, glibc keeps freed memory), which PyTorch's side then shares; "
                             "default: JAX's and glibc's defaults")
    parser.add_argument("--quick", action="store_true", help=f"tiny CPU check: {QUICK}")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv and not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv += ["--config", QUICK["config"]]
    config, args = parse_cli(parser, argv)
    if args.quick:
        for key, value in QUICK.items():
            if key != "config":
                setattr(args, key, value)
    if args.cpu_process == "trainer":
        cpu_process.run_computations_inline()  # before the backend starts, as the train CLI does
        cpu_process.keep_freed_memory()
    llm = llm_of(config.model)
    if args.layers:
        llm.num_layers = args.layers
    if args.seq > llm.get("max_position_embeddings", args.seq):
        llm.max_position_embeddings = args.seq
    if "image_context_id" in config.model and config.model.image_context_id < 0:
        config.model.image_context_id = 3  # a preset without its tokenizer's id: any id of the vocabulary
    if args.batch % jax.device_count():
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {jax.device_count()} devices (the batch is "
                         "split over all of them)")
    batch, images = random_batch(config, config.model.to_dict(), args.batch, args.seq)
    print(f"{config_name(argv)}: {config.model.kind}, LLM {llm.get('family')} {llm.num_layers} layers, "
          f"hidden {llm.hidden_size}, {llm.get('dtype')}; batch {args.batch} x {args.seq} tokens, "
          f"{images} images/tiles; "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    impls = [impl for impl in args.impls.split(",") if impl]
    jax_steps = [JaxStep(config, impl, batch, images, args) for impl in impls]
    if args.cpu_scheduler:
        if jax.devices()[0].platform != "cpu":
            raise SystemExit("--cpu-scheduler compares XLA:CPU schedulers: it needs the CPU backend")
        jax_steps += [JaxStep(config, impl, batch, images, args, args.cpu_scheduler) for impl in impls]
    runners = {step.label: step for step in jax_steps}
    torch_step = None if args.no_torch else TorchStep.create(config, batch, images, args)
    if torch_step is not None:
        runners["pytorch"] = torch_step
    rounds, faults = {name: [] for name in runners}, dict.fromkeys(runners, 0)
    for _ in range(args.rounds):
        for name, runner in runners.items():
            before = minor_page_faults()
            rounds[name].append(runner.run(args.steps))
            faults[name] += minor_page_faults() - before
    seconds = {name: float(np.median(times)) for name, times in rounds.items()}
    for name, runner in runners.items():
        runner.report(seconds[name])
    if jax.devices()[0].platform == "cpu":  # host memory the step maps in afresh: README "On CPU"
        print("host page faults per step: " + ", ".join(f"{name} {faults[name] / (args.rounds * args.steps):.0f}"
                                                         for name in runners)
              + f" (CPU process settings: {args.cpu_process})")
    if torch_step is not None:
        for impl in runners:
            if impl != "pytorch":
                ratio = seconds["pytorch"] / seconds[impl]
                print(f"ratio jax attention_impl={impl} / pytorch throughput: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
