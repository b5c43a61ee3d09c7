"""AdamW with warm-up + cosine/constant schedules, a weight-decay mask, clipping, and regex-based freezing."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import optax
from flax import nnx

from leo_jax.train.config import NO_DECAY_ROLES, TrainConfig


def param_path(path: Sequence) -> str:
    """('llm', 'layers', 'attn', 'q_proj', 'kernel') -> 'llm/layers/attn/q_proj/kernel'."""
    return "/".join(str(p) for p in path)


class TrainableFilter:
    """nnx filter: a Param whose path fully matches a `trainable` pattern and no `frozen` pattern."""

    def __init__(self, trainable: Sequence[str], frozen: Sequence[str]):
        self.trainable = [re.compile(p) for p in trainable]
        self.frozen = [re.compile(p) for p in frozen]

    def __call__(self, path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        name = param_path(path)
        return any(p.fullmatch(name) for p in self.trainable) and not any(p.fullmatch(name) for p in self.frozen)


def check_patterns(model: nnx.Module, cfg: TrainConfig) -> None:
    """Every freezing pattern must match some parameter (a typo would silently train or freeze the wrong set)."""
    names = [param_path(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    for field in ("trainable", "frozen"):
        for pattern in getattr(cfg, field):
            if not any(re.fullmatch(pattern, n) for n in names):
                tops = sorted({n.split("/")[0] for n in names})
                raise ValueError(f"config.train.{field}: pattern {pattern!r} matches no parameter (patterns must "
                                 f"match whole paths such as {names[0]!r}; top-level modules: {tops})")


def count_params(state: nnx.State) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def learning_rate_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over warmup_fraction * steps, then cosine decay to final_lr_fraction * lr (or
    constant)."""
    warmup = int(round(cfg.warmup_fraction * total_steps))
    peak = cfg.learning_rate
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=cfg.final_lr_fraction)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decays(variable: nnx.Variable, no_decay_roles: Sequence[str] = NO_DECAY_ROLES) -> bool:
    """Weight decay unless the parameter's `role` metadata (layers.common) is in `no_decay_roles`: by default every
    bias and norm scale is exempt, as in the Hugging Face Trainer the LLaVA / InternVL recipes ran with."""
    role = variable.get_metadata().get("role")
    if role is None:
        raise ValueError(f"a parameter of shape {variable.get_value().shape} has no 'role' metadata; create it with "
                         "leo_jax.layers.common.param(..., role=...)")
    return role not in no_decay_roles


def decay_mask_fn(no_decay_roles: Sequence[str] = NO_DECAY_ROLES):
    """The optax mask function: a bool per parameter from its role."""
    def mask(params: nnx.State) -> nnx.State:
        return jax.tree.map(lambda v: v.replace(decays(v, no_decay_roles)), params,
                            is_leaf=lambda v: isinstance(v, nnx.Variable))
    return mask


def decay_summary(params: nnx.State, no_decay_roles: Sequence[str] = NO_DECAY_ROLES) -> str:
    """'decayed 1,234 (kernel 1,000, embedding 234); not decayed 56 (bias 40, norm 16)' for the start-up log."""
    counts: dict[bool, dict[str, int]] = {True: {}, False: {}}
    for variable in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable)):
        role = variable.get_metadata().get("role")
        group = counts[decays(variable, no_decay_roles)]
        group[role] = group.get(role, 0) + math.prod(variable.get_value().shape)

    def line(group):
        detail = ", ".join(f"{role} {n:,}" for role, n in sorted(group.items()))
        return f"{sum(group.values()):,}" + (f" ({detail})" if detail else "")
    return f"decayed {line(counts[True])}; not decayed {line(counts[False])}"


def make_optimizer(cfg: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask_fn(cfg.no_decay_roles))
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw) if cfg.grad_clip_norm > 0 else adamw
    return tx, schedule
