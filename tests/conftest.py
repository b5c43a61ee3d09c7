"""Test-wide setup: 8 fake CPU devices and fp32-exact matmuls, set before JAX is imported (subprocesses inherit it)."""
import os

# 8 fake CPU devices; generous collective time-outs because a loaded 2-core machine can starve one of the 8 device
# threads for longer than XLA's default 40 s, which aborts the process instead of waiting.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                                   "--xla_cpu_collective_timeout_seconds=900")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
