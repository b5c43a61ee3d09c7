"""Process settings for training on CPU, so that each step reuses the memory of the last one.

XLA:CPU allocates the temporaries of one call of a compiled program as one block (113 MiB for the tiny LEO-MINI
train step) and frees it when the call ends. By default JAX runs CPU computations on worker threads, whose glibc
arenas cannot hold a block that large, so glibc maps it afresh with `mmap` on every call and the kernel faults every
page in again: ~30,000 page faults, about a third of the tiny step on a 2-core machine. Two settings keep the pages:

1. `run_computations_inline`, before the JAX backend starts: single-device CPU computations run on the calling (main)
   thread (`jax_cpu_enable_async_dispatch=False`), whose allocations come from glibc's main arena. Only when every
   input is ready: a computation whose input is still being copied in runs later on a worker thread, so the trainer
   waits for each batch's copy first (`wait_for_inputs`).
2. `keep_freed_memory`, after `jax.distributed` starts, on CPU only: the main arena serves large blocks from its
   heap and keeps freed memory instead of returning it to the system (`mallopt` M_MMAP_MAX=0, M_TRIM_THRESHOLD
   2 GiB), so the next call's block lands on pages already mapped. The process keeps its peak heap size until it exits.

The train CLI and benchmarks/bench_step apply both; README "On CPU" has the measurements. Numbers are unchanged: the
same compiled program runs, only on another thread and other pages.
"""

from __future__ import annotations

import ctypes
import logging
import os

import jax

logger = logging.getLogger("leo_jax.train")

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest value mallopt takes (an int)


def run_computations_inline() -> None:
    """Single-device CPU computations run on the calling thread. Takes effect only when called before the JAX backend
    starts (the first device query, array or jit call); it does not change GPU / TPU computations."""
    jax.config.update("jax_cpu_enable_async_dispatch", False)


def wait_for_inputs(arrays, mesh: jax.sharding.Mesh) -> None:
    """On a CPU mesh, returns once `arrays` (e.g. a batch just copied to the devices) are ready, so that the next
    computation on them can run inline; elsewhere returns at once (the copy overlaps the running step)."""
    if mesh.devices.flat[0].platform == "cpu":
        jax.block_until_ready(arrays)


def keep_freed_memory() -> bool:
    """On a CPU job (JAX's default backend; this starts it), glibc's main arena stops mapping large blocks separately
    and stops returning freed memory to the system. Returns whether it applied: only on CPU with glibc (not macOS or
    musl)."""
    if jax.default_backend() != "cpu":
        return False
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"; unknown name (ValueError) elsewhere
    except (ValueError, OSError):
        libc_version = None
    if not libc_version or not libc_version.startswith("glibc"):
        logger.info("the C library is not glibc: the CPU step's temporaries are mapped in on every step")
        return False
    libc = ctypes.CDLL(None)
    applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if applied:
        logger.info("CPU process: glibc keeps freed memory, so each step's temporaries reuse mapped pages")
    else:
        logger.warning("glibc's mallopt refused M_MMAP_MAX / M_TRIM_THRESHOLD: the CPU step's temporaries are mapped "
                       "in on every step")
    return applied
