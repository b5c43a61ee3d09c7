"""The jitted train step: masked cross-entropy + weighted MMoE balance loss, gradient accumulation over
micro-batches inside the step (lax.scan), AdamW update of the trainable parameters only.

Loss normalisation: the cross-entropy is summed over the supervised tokens of the WHOLE global batch and divided by
their count, so accumulating micro-batch gradients gives the full-batch gradient (up to float summation order).
The balance loss (a per-batch statistic) is averaged over micro-batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from leo_jax.sharding import constrain, data_sharding
from leo_jax.train.state import TrainState

# Batch entries the model never reads (host bookkeeping); kept off the device.
HOST_ONLY_KEYS = ("sample_index",)
# XLA:CPU maps the temporaries of every call of a program in afresh, so each MiB of them costs page faults on every
# step. Its memory-optimised scheduler orders the step for smaller temporaries (tiny LEO-MINI, everything trained:
# 149 -> 113 MiB). README "On CPU" has the measurements.
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def cross_entropy_sum(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Sum over supervised tokens of -log softmax(logits)[label] = logsumexp(logits) - logits[label], in fp32. The
    label's logit is picked with a one-hot comparison, whose gradient is elementwise (a gather's is a scatter)."""
    logits = logits.astype(jnp.float32)
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    picked = jnp.sum(jnp.where(labels[..., None].astype(jnp.int32) == vocab, logits, 0.0), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(nll * loss_mask.astype(jnp.float32))


def micro_batches(batch: Mapping[str, jax.Array], num: int) -> dict[str, jax.Array]:
    """[B, ...] -> [num, B/num, ...] with micro-batch i = rows i, i+num, ...: each device's contiguous block of
    the batch axis splits evenly, so every micro-batch stays spread over all data-parallel devices."""
    out = {}
    for key, x in batch.items():
        b = x.shape[0]
        if b % num:
            raise ValueError(f"batch entry {key!r} has {b} rows, not divisible by train.grad_accum_steps={num}")
        x = jnp.swapaxes(x.reshape(b // num, num, *x.shape[1:]), 0, 1)
        out[key] = constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
    return out


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    grad_accum_steps: int, balance_loss_weight: float):
    """train_step(state, batch) -> (new state, metrics) as a pure function (jit it with `jit_train_step`)."""

    def micro_loss(trainable, frozen, micro, rng, num_tokens):
        model = nnx.merge(graphdef, trainable, frozen)
        out = model.train_forward(micro, rng=rng, deterministic=False)
        ce_sum = cross_entropy_sum(out.out, micro["labels"], micro["loss_mask"])
        stats = {"ce_sum": ce_sum}
        if "visual_token_mismatch" in out.aux:  # raised on the host when the metrics are fetched (loop._log)
            stats["visual_token_mismatch"] = out.aux["visual_token_mismatch"]
        loss = ce_sum / num_tokens
        if "balance_loss" in out.aux:
            balance = jnp.mean(out.aux["balance_loss"])
            loss = loss + balance_loss_weight * balance / grad_accum_steps
            stats.update(balance_loss=balance, expert_load=jnp.mean(out.aux["expert_load"], axis=0),
                         router_entropy=jnp.mean(out.aux["router_entropy"]))
        return loss, stats

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        if grad_accum_steps == 1:
            grads, stats = grad_fn(state.trainable, state.frozen, batch, rng, num_tokens)
        else:
            def body(acc, inputs):
                i, micro = inputs
                g, s = grad_fn(state.trainable, state.frozen, micro, jax.random.fold_in(rng, i), num_tokens)
                return jax.tree.map(jnp.add, acc, g), s

            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            grads, stats = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps),
                                                      micro_batches(batch, grad_accum_steps)))
            summed = ("ce_sum", "visual_token_mismatch")
            stats = {k: (jnp.sum(v, 0) if k in summed else jnp.mean(v, 0)) for k, v in stats.items()}
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ce = stats.pop("ce_sum") / num_tokens
        metrics = {"loss": ce, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step),
                   "supervised_tokens": num_tokens, **stats}
        if "balance_loss" in metrics:
            metrics["total_loss"] = ce + balance_loss_weight * metrics["balance_loss"]
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new_state, metrics

    return train_step


def batch_shardings(batch_shapes: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """Every batch entry sharded over the batch axes on dim 0."""
    return {k: data_sharding(mesh, len(v.shape)) for k, v in batch_shapes.items()}


def jit_train_step(train_step, state_shardings, batch_shapes: Mapping[str, Any], mesh: Mesh):
    """jax.jit with explicit in/out shardings on `mesh`; the state is donated (updated in place). On a CPU mesh the
    step compiles with CPU_COMPILER_OPTIONS."""
    replicated = NamedSharding(mesh, P())
    cpu = mesh.devices.flat[0].platform == "cpu"
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings(batch_shapes, mesh)),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,),
                   compiler_options=CPU_COMPILER_OPTIONS if cpu else None)


def device_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k not in HOST_ONLY_KEYS}
