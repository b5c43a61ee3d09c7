"""Shared check: a module's jitted forward on several 8-device meshes equals its single-device forward."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from leo_jax.sharding import build_mesh, data_sharding, shard_module

MESHES = ({"data": 8, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 4, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2})


def jit_forward(graphdef, fn):
    @jax.jit
    def run(state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    return run


def assert_sharded_matches(module: nnx.Module, fn, inputs: tuple, meshes=MESHES, atol: float = 1e-5):
    """`fn(module, *inputs)` under jit on one device vs on each mesh (params by logical axes, inputs batch-sharded).

    Returns the max abs difference seen. Inputs' leading dim must be divisible by data*fsdp of each mesh."""
    graphdef, state = nnx.split(module)
    run = jit_forward(graphdef, fn)
    reference = jax.tree.map(np.asarray, run(state, *inputs))
    worst = 0.0
    for sizes in meshes:
        mesh = build_mesh({"ici": sizes})
        with jax.set_mesh(mesh):
            sharded = shard_module(nnx.clone(nnx.merge(graphdef, state)), mesh)  # the caller's module stays put
            _, sharded_state = nnx.split(sharded)
            args = [jax.device_put(x, data_sharding(mesh, np.ndim(x))) for x in inputs]
            out = jax.tree.map(np.asarray, run(sharded_state, *args))
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
            worst = max(worst, diff)
            assert diff <= atol, f"mesh {sizes}: max abs diff {diff} > {atol}"
    return worst
