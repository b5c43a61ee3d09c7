"""Throughput, the MFU estimate, and metric sinks (console log line, metrics.jsonl, TensorBoard event files).

FLOPs formula (model FLOPs, as MaxText / PaLM count them; rematerialisation is not counted):
    train FLOPs per step = 3 * forward FLOPs per row * rows per step
where forward FLOPs per row = `cfg.forward_flops(seq_len[, tiles or images])` of the model config when it has one
(LLM: 2 * T * matmul weights + causal attention 2 * L * H * D * T^2; LEO / LEO-MINI add their vision encoders, CoTR
and projectors for the real tiles / images of the batch), else 2 * N * T with N the parameter count. The factor 3
is forward + backward (activation and weight gradients); frozen parameters need no weight gradient, so for partly
frozen stages this overstates the work done (an MFU upper bound), as is usual in MFU reporting.
    MFU = train FLOPs per step / (step time * devices * peak FLOP/s per device)
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

logger = logging.getLogger("leo_jax.train")

# Dense bf16 peak FLOP/s per device (chip / GPU), from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def peak_flops_per_device(configured: float = 0.0, device_kind: str | None = None) -> float | None:
    """The configured value, else the data-sheet value for the device kind (longest matching prefix), else None."""
    if configured > 0:
        return configured
    kind = device_kind or jax.devices()[0].device_kind
    matches = [k for k in PEAK_FLOPS if kind.startswith(k)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def forward_flops_per_row(model_cfg: Any, seq_len: int, num_params: int, visual: float | None = None) -> float:
    """Forward FLOPs of one row of `seq_len` tokens; `visual` = that row's (mean) number of tiles or images (the
    model config's `visual_count`), else the config's default."""
    if hasattr(model_cfg, "forward_flops"):
        if visual is not None and hasattr(model_cfg, "visual_count"):
            return float(model_cfg.forward_flops(seq_len, visual))
        return float(model_cfg.forward_flops(seq_len))
    return 2.0 * num_params * seq_len


def train_flops_per_step(model_cfg: Any, seq_len: int, rows: int, num_params: int,
                         counts: Mapping[str, float] | None = None) -> float:
    """Train FLOPs of a step of `rows` rows; `counts` = the step's real tiles / images (`batch_counts` over the
    global batch) so vision work is counted for the images present, not for every slot."""
    unit = getattr(model_cfg, "visual_count", None)
    visual = counts[unit] / rows if counts and unit in counts else None
    return 3.0 * forward_flops_per_row(model_cfg, seq_len, num_params, visual) * rows


def batch_counts(batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Host-side counts of a (process-local) numpy batch: tokens (non-padding), images, tiles."""
    counts = {"tokens": float(np.sum(batch["segment_ids"] != 0))}
    if "image_mask" in batch and batch["image_mask"].size:
        counts["images"] = float(np.sum(batch["image_mask"]))
    if "tile_mask" in batch:
        counts["tiles"] = float(np.sum(batch["tile_mask"]))
    return counts


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def to_scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flattens metrics to floats; vectors (e.g. expert_load [E]) become name/0, name/1, ..."""
    out = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[prefix + key] = float(value)
        else:
            out.update({f"{prefix}{key}/{i}": float(v) for i, v in enumerate(value.reshape(-1))})
    return out


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a blank or torn line (a process killed mid-write)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsWriter:
    """metrics.jsonl (one JSON object per record, with 'step') + TensorBoard event files; process 0 only.

    The workdir may be remote (gs://... or another etils.epath / fsspec path): object stores cannot append, so
    there metrics.jsonl is rewritten whole at each write (an atomic object write; a few thousand lines at most)."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self.remote = "://" in str(workdir)
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lines = (self.path.read_text().splitlines(keepends=True) if self.remote and self.path.exists()
                       else [])
        self.jsonl = None if self.remote else open(self.path, "a")
        self.tensorboard_dir = str(epath.Path(workdir) / "tensorboard")
        self.tensorboard = None  # opened at the first write, or by `truncate` with the step to purge from

    def _open_tensorboard(self, purge_step: int | None = None) -> None:
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(self.tensorboard_dir, purge_step=purge_step)

    def truncate(self, step: int) -> None:
        """Drops the records after `step` (a resumed run rewrites them), atomically (temp file + rename locally,
        one object write remotely). TensorBoard event files are append-only: a new event file starts with a purge
        marker at step + 1 (tensorboardX `purge_step`), so TensorBoard hides the earlier files' later steps."""
        if not self.active:
            return
        if self.tensorboard is not None:
            self.tensorboard.close()
        self._open_tensorboard(purge_step=step + 1)
        if self.remote:
            self._lines = [line for line in self._lines if _record_step(line) <= step]
            self.path.write_text("".join(self._lines))
            return
        self.jsonl.close()
        kept = [line for line in self.path.read_text().splitlines(keepends=True) if _record_step(line) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)
        self.jsonl = open(self.path, "a")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}
        line = json.dumps({"step": step, **clean}) + "\n"
        if self.remote:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        else:
            self.jsonl.write(line)
            self.jsonl.flush()
        if self.tensorboard is None:
            self._open_tensorboard()
        for key, value in scalars.items():
            self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.active:
            if self.jsonl is not None:
                self.jsonl.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
