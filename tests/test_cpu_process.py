"""The train CLI's CPU process settings (leo_jax.train.cpu_process): a program's temporaries land on pages that are
already mapped, call after call, instead of being page-faulted in afresh. Each case runs in its own process, as the
settings act on the whole process; the page-fault counts are the kernel's (getrusage), no times are asserted."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A program whose 12 intermediates of 4 MiB are all live at its end (96 MiB of temporaries, which XLA:CPU allocates as
# one block per call), called as the trainer calls its step (on an input just copied in) 6 times after 2 warm-up calls;
# prints its temporaries and minor page faults per call. Modes: "trainer" (the settings, waiting for the copy as the
# trainer does) and "default". Without the wait the program runs on a worker thread and maps its block afresh whenever
# the copy is still under way when it is called: on an idle machine every call (~26,000 faults), under load sometimes
# none, so that case is timing-dependent and not tested.
SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import jax, jax.numpy as jnp, numpy as np
    from leo_jax.train import cpu_process
    applied = None
    if sys.argv[1] == "trainer":
        cpu_process.run_computations_inline()
        applied = cpu_process.keep_freed_memory()
    mesh = jax.make_mesh((1,), ("data",))

    def program(x):
        hs = [jnp.tanh(x @ x + i) for i in range(12)]
        return sum((jnp.sin(h) @ h).sum() for h in hs) + sum(h[0].sum() * h[:, 0].sum() for h in hs)

    host_x = np.full((1024, 1024), 1 / 1024, np.float32)
    compiled = jax.jit(program).lower(host_x).compile()

    def call():  # as the trainer calls its step: on a batch just copied in
        x = jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, jax.P()), host_x)
        if sys.argv[1] == "trainer":
            cpu_process.wait_for_inputs(x, mesh)
        compiled(x).block_until_ready()

    for _ in range(2):
        call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(6):
        call()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 6
    print(json.dumps({"applied": applied, "faults_per_call": faults,
                      "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}))
""")


def _run(settings: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}  # one device, as a job
    out = subprocess.run([sys.executable, "-c", SCRIPT, settings], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _transparent_huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and Linux page-fault counts")
def test_trainer_cpu_settings_reuse_the_temporaries_pages():
    trainer, default = _run("trainer"), _run("default")
    pages = trainer["temp_bytes"] / 4096
    assert trainer["temp_bytes"] > 64 * 2**20, trainer  # larger than glibc's largest heap-served block (32 MiB)
    assert trainer["applied"] is True
    # With the settings a call maps (almost) nothing in; the 96 MiB block alone is 24,600 pages.
    assert trainer["faults_per_call"] < 0.05 * pages, (trainer, default)
    if not _transparent_huge_pages_always():  # with huge pages for every mapping the default faults 512x less
        assert default["faults_per_call"] > 0.5 * pages, (trainer, default)
