"""`python -m benchmarks.bench_step --quick` runs the trainer's whole tiny LEO-MINI step (experts, CoTR, LLM) with
images for xla and splash (interpret mode) and the PyTorch LeoMiniForCausalLM on CPU, and prints every figure
line (tokens/s, images/s, MFU, memory, temporaries, host page faults) and the JAX / PyTorch ratio (no time values are
asserted)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_step_quick_prints_figures_and_ratio():
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one CPU device, as a plain run
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_step", "--quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for impl in ("xla", "splash"):
        line = next(x for x in lines if x.startswith(f"jax attention_impl={impl} "))
        assert re.search(r"step +[\d.]+ s +[\d.]+ tokens/s +[\d.]+ images/s .*MFU .*peak memory .* temporaries per "
                         r"call [\d.]+ MiB$", line), line
        assert re.search(rf"^ratio jax attention_impl={impl} / pytorch throughput: [\d.]+x$", out.stdout, re.MULTILINE)
    assert re.search(r"^host page faults per step: xla \d+, splash \d+, pytorch \d+ \(CPU process settings: trainer\)$",
                     out.stdout, re.MULTILINE)
    assert any(re.match(r"pytorch LeoMiniForCausalLM on cpu: step +[\d.]+ s +[\d.]+ tokens/s +[\d.]+ images/s", x)
               for x in lines)


def test_bench_step_cpu_scheduler_compares_the_trainers_scheduler_with_xla_default():
    """--cpu-scheduler adds the same step compiled with another XLA:CPU scheduler: the trainer's memory-optimised
    schedule needs fewer temporaries per call than XLA:CPU's default one."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_step", "--config", "tiny_leo_mini_train", "--layers",
                          "1", "--batch", "2", "--seq", "96", "--steps", "1", "--warmup", "1", "--impls", "xla",
                          "--no-torch", "--cpu-scheduler", "CPU_SCHEDULER_TYPE_DEFAULT"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    temporaries = dict(re.findall(r"^jax attention_impl=(xla(?: with CPU_SCHEDULER_TYPE_DEFAULT)?) .* temporaries per "
                                  r"call ([\d.]+) MiB$", out.stdout, re.MULTILINE))
    assert float(temporaries["xla"]) < float(temporaries["xla with CPU_SCHEDULER_TYPE_DEFAULT"]), out.stdout
    assert re.search(r"^host page faults per step: xla \d+, xla with CPU_SCHEDULER_TYPE_DEFAULT \d+ "
                     r"\(CPU process settings: trainer\)$", out.stdout, re.MULTILINE)
