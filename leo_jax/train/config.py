"""The `config.train` section as a validated dataclass (defaults and comments: leo_jax.configs.common_train)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from leo_jax.config import dataclass_from_config, require
from leo_jax.layers.common import BIAS, NORM, ROLES

SCHEDULES = ("cosine", "constant")
NO_DECAY_ROLES = (BIAS, NORM)  # parameter roles exempt from weight decay by default


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int  # optimizer steps; -1 = one pass over data.train_files x data.num_epochs (no packing)
    learning_rate: float
    schedule: str = "cosine"
    warmup_fraction: float = 0.03
    final_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    no_decay_roles: tuple[str, ...] = NO_DECAY_ROLES
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip_norm: float = 1.0
    grad_accum_steps: int = 1
    trainable: tuple[str, ...] = (".*",)
    frozen: tuple[str, ...] = ()
    balance_loss_weight: float = 0.05
    init: dict = dataclasses.field(default_factory=dict)
    log_every: int = 10
    eval_every: int = 0
    eval_at_end: bool = True
    eval_max_batches: int = -1
    eval_max_new_tokens: int = 16
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    resume_step: int = -1
    checkpoint_fallback: bool = True
    allow_config_change: bool = False
    peak_flops_per_device: float = 0.0

    def __post_init__(self):
        w = "config.train"
        require(self.steps == -1 or self.steps > 0, f"{w}.steps={self.steps}: give a positive number of steps, or "
                                                    "-1 for one pass over the training data")
        require(self.learning_rate >= 0, f"{w}.learning_rate must be >= 0")
        require(self.schedule in SCHEDULES, f"{w}.schedule={self.schedule!r}: use one of {SCHEDULES}")
        require(0 <= self.warmup_fraction < 1, f"{w}.warmup_fraction must be in [0, 1)")
        require(0 <= self.final_lr_fraction <= 1, f"{w}.final_lr_fraction must be in [0, 1]")
        unknown = sorted(set(self.no_decay_roles) - set(ROLES))
        require(not unknown, f"{w}.no_decay_roles: unknown role(s) {unknown}; roles are {ROLES}")
        require(self.grad_accum_steps >= 1, f"{w}.grad_accum_steps must be >= 1")
        require(self.grad_clip_norm >= 0, f"{w}.grad_clip_norm must be >= 0 (0 = no clipping)")
        for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
            require(getattr(self, name) >= 1, f"{w}.{name} must be >= 1")
        require(self.resume_step >= -1, f"{w}.resume_step={self.resume_step}: give a saved step, or -1 for the newest")
        require(self.eval_every >= 0, f"{w}.eval_every must be >= 0 (0 = only at the end)")
        for field in ("trainable", "frozen"):
            for pattern in getattr(self, field):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{w}.{field}: {pattern!r} is not a regular expression ({e})") from e
        for path, ckpt in self.init.items():
            require(isinstance(ckpt, str) and ckpt, f"{w}.init[{path!r}] must be a checkpoint directory path")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.train") -> TrainConfig:
        return dataclass_from_config(cls, config, where)
