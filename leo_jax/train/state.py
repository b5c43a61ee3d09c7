"""The train state (trainable / frozen parameters, optimizer state, step, rng), created directly sharded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from leo_jax.sharding import tree_shardings


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training. `frozen` holds the frozen parameters and any other model
    variables; they pass through the step unchanged (no gradient, no optimizer state)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    rng: jax.Array  # uint32[2] raw key; step s uses fold_in(rng, s)
    trainable: nnx.State
    frozen: nnx.State
    opt_state: Any

    def model(self, graphdef: nnx.GraphDef) -> nnx.Module:
        return nnx.merge(graphdef, self.trainable, self.frozen)


def split_model(model: nnx.Module, trainable_filter) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable params, everything else)."""
    return nnx.split(model, nnx.All(nnx.Param, trainable_filter), ...)


def init_fn(build_model: Callable[[nnx.Rngs], nnx.Module], trainable_filter, tx: optax.GradientTransformation,
            seed: int) -> Callable[[], TrainState]:
    """A pure function creating the initial state (jit it with out_shardings to create it sharded)."""

    def init() -> TrainState:
        model = build_model(nnx.Rngs(params=seed))
        _, trainable, frozen = split_model(model, trainable_filter)
        return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed + 1), trainable=trainable,
                          frozen=frozen, opt_state=tx.init(trainable))

    return init


def create_train_state(build_model, trainable_filter, tx, seed: int, mesh: Mesh):
    """(graphdef, state, state shardings): the state created under jit straight into its shardings on `mesh`
    (no full copy on one device)."""
    graphdef, _, _ = split_model(nnx.eval_shape(lambda: build_model(nnx.Rngs(params=seed))), trainable_filter)
    init = init_fn(build_model, trainable_filter, tx, seed)
    abstract = jax.eval_shape(init)
    shardings = tree_shardings(abstract, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings


def abstract_train_state(build_model, trainable_filter, tx, seed: int, mesh: Mesh):
    """(graphdef, abstract state with shardings, shardings): the restore target / AOT input, nothing allocated."""
    graphdef, _, _ = split_model(nnx.eval_shape(lambda: build_model(nnx.Rngs(params=seed))), trainable_filter)
    abstract = jax.eval_shape(init_fn(build_model, trainable_filter, tx, seed))
    shardings = tree_shardings(abstract, mesh)
    return graphdef, with_shardings(abstract, shardings), shardings


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their target sharding (Variables keep their metadata)."""

    def one(sharding, leaf):
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            return leaf.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree.map(one, shardings, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
