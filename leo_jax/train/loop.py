"""The training loop: set-up (mesh, sharded state, data, checkpoints, resume), the step loop with logging,
evaluation and checkpointing, SIGTERM handling and the non-finite-loss stop.

Failure behaviour: one trainer per workdir (a lock file); every exit (error, signal, end) waits for the pending
checkpoint write and logs the newest complete checkpoint; a checkpoint is only written when every parameter and
optimizer value is finite; resume falls back past an unreadable newest checkpoint, can start from an older one
(train.resume_step) and refuses config changes that would misplace the data position or re-stretch the schedule
(train.allow_config_change).

Multi-process: every decision is the same on every process. Before each step the processes exchange (host to host,
`distributed.allgather_json`) their batch's padded length, whether SIGTERM arrived and whether their data ended: all
pad to the longest, and all save and stop together. The non-finite-loss stop reads the global loss, the same on every
process; evaluation gathers the answers of all processes. Only process 0 writes metrics, TensorBoard and eval results.
The data position is saved as one global record, so a run resumes on another number of processes (without packing).

The loop never waits for the device except to log (every `train.log_every` steps), to check the pending losses
before a checkpoint, and to evaluate: steps are dispatched asynchronously while the host prepares the next batch.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import PartitionSpec as P

from leo_jax.data import pipeline, preflight, sources, templates, visual
from leo_jax.models.registry import build_model, model_config
from leo_jax.sharding import batch_shards, build_mesh
from leo_jax.train import cpu_process, distributed
from leo_jax.train import metrics as metrics_lib
from leo_jax.train.checkpoint import Checkpointer
from leo_jax.train.config import TrainConfig
from leo_jax.train.evaluate import Evaluator
from leo_jax.train.optimizer import TrainableFilter, check_patterns, count_params, decay_summary, make_optimizer
from leo_jax.train.pretrained import apply_init
from leo_jax.train.state import abstract_train_state, create_train_state
from leo_jax.train.step import device_batch, jit_train_step, make_train_step
from leo_jax.train.synthetic_data import ensure_synthetic_data
from leo_jax.train.workdir import WorkdirLock, check_writable

logger = logging.getLogger("leo_jax.train")

LOSS_KEYS = ("loss", "total_loss", "grad_norm")  # checked for NaN / inf at every log and before every checkpoint


# Config fields a resumed run must share with its checkpoint: the saved data position refers to these records in
# this order, and the learning-rate schedule to this length and shape (train.allow_config_change=True overrides).
RESUME_FIELDS = ("seed", "data.train_files", "data.image_root", "data.split", "data.seed", "data.shuffle",
                 "data.num_epochs", "data.global_batch_size", "data.seq_len", "data.packing", "data.template",
                 "data.tokenizer", "data.visual_budget", "train.steps", "train.schedule", "train.warmup_fraction",
                 "train.final_lr_fraction", "train.grad_accum_steps")
# What a checkpoint written before a field existed ran with (its saved config lacks the field).
RESUME_FIELD_DEFAULTS = {"data.visual_budget": -1}


class NonFiniteLossError(FloatingPointError):
    """The loss or the parameters became NaN or infinite; the message names the step."""


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _config_value(config: Any, dotted: str) -> Any:
    """The value at a dotted path of a (nested dict) config as JSON would store it; None when absent."""
    node = config
    for name in dotted.split("."):
        if not hasattr(node, "get") or name not in node:
            return None
        node = node[name]
    return json.loads(json.dumps(node.to_dict() if hasattr(node, "to_dict") else node))


def _resume_value(config: Any, field: str) -> Any:
    value = _config_value(config, field)
    return RESUME_FIELD_DEFAULTS.get(field) if value is None else value


def config_changes(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
    """'field: saved -> current' for each RESUME_FIELDS entry that differs."""
    values = ((field, _resume_value(saved, field), _resume_value(current, field)) for field in RESUME_FIELDS)
    return [f"{field}: {before!r} -> {now!r}" for field, before, now in values if before != now]


def prepare_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the sections the trainer needs and fills model fields that come from the tokenizer."""
    for section in ("model", "data", "train"):
        if section not in config:
            raise ValueError(f"the config has no `{section}` section; a training preset composes a model preset "
                             "with leo_jax.configs.common_data and leo_jax.configs.common_train (see the "
                             "tiny_leo_mini_train preset)")
    config = ml_collections.ConfigDict(config.to_dict())  # a private copy
    tokenizer = pipeline.prepare_tokenizer(config.data)
    if "image_context_id" in config.model and config.model.image_context_id < 0:
        config.model.image_context_id = tokenizer.token_to_id(templates.IMG_CONTEXT)
    return config


def total_steps(train_cfg: TrainConfig, data_config) -> int:
    """train.steps, or one pass over the training files x data.num_epochs when it is -1."""
    if train_cfg.steps > 0:
        return train_cfg.steps
    if data_config.packing or data_config.num_epochs is None:
        raise ValueError("config.train.steps=-1 (one pass over the data) needs data.packing=False and a finite "
                         "data.num_epochs; give config.train.steps explicitly")
    records = len(sources.open_sources(data_config.train_files, data_config.image_root or None,
                                       split=data_config.split))
    return math.ceil(records * data_config.num_epochs / data_config.global_batch_size)


class _StopSignal:
    """Records SIGTERM (preemption, scheduler stop) so the loop can save and exit at the next step boundary."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logger.warning("SIGTERM received: saving a checkpoint after the current step, then exiting")
        self.received = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """`Trainer(config, workdir).run()`: trains (resuming from workdir/checkpoints if present), returns the last
    evaluation metrics."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = prepare_config(config)
        self.workdir = workdir
        self.train_cfg = TrainConfig.from_config(self.config.train)
        self.model_cfg = model_config(self.config.model)
        self.kind = visual.for_model(self.model_cfg, self.config.data)
        self.mesh = build_mesh(self.config.mesh)
        self.total_steps = total_steps(self.train_cfg, self.config.data)
        self.tx, self.schedule = make_optimizer(self.train_cfg, self.total_steps)
        self.filter = TrainableFilter(self.train_cfg.trainable, self.train_cfg.frozen)
        self.seed = int(self.config.seed)
        check_patterns(nnx.eval_shape(lambda: self._build(nnx.Rngs(params=self.seed))), self.train_cfg)
        primary = jax.process_index() == 0
        if "://" not in workdir:
            check_writable(workdir, "the work directory")
        self.lock = WorkdirLock(workdir, primary).acquire()
        try:
            self.checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                             keep=self.train_cfg.keep_checkpoints,
                                             async_save=self.train_cfg.async_checkpoint, primary=primary)
            self.writer = metrics_lib.MetricsWriter(workdir)
        except BaseException:
            self.lock.release()
            raise
        self.graphdef = self.state = self.state_shardings = None
        self.iterator = None
        self._train_step = None
        self._evaluator = None
        # (step, device metrics, padded length, the step's process-local tokens / images / tiles)
        self._pending: list[tuple[int, dict, int, dict]] = []
        self._counts = {"tokens": 0.0, "images": 0.0, "tiles": 0.0}
        self._last_log = None
        self.last_eval: dict[str, float] = {}

    def _build(self, rngs: nnx.Rngs) -> nnx.Module:
        return build_model(self.config.model, rngs)

    # --- set-up --------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Creates (or restores) the sharded state and the data iterator at the right position."""
        data = self.config.data
        logger.info("data: training on %s; evaluating on %s", data.train_files,
                    data.eval_files or "the training files")
        self.iterator = pipeline.make_train_iterator(data, self.kind, **self._budget_layout())
        steps = self.checkpointer.all_steps()
        resume_step = self.train_cfg.resume_step
        if resume_step >= 0:
            if resume_step not in steps:
                raise ValueError(f"config.train.resume_step={resume_step}: there is no checkpoint {resume_step} in "
                                 f"{self.checkpointer.directory} (available: {steps or 'none'})")
            self.checkpointer.set_aside([s for s in steps if s > resume_step], f"after-resume-step-{resume_step}")
        if not steps:
            self.graphdef, self.state, self.state_shardings = create_train_state(
                self._build, self.filter, self.tx, self.seed, self.mesh)
            if self.train_cfg.init:
                self.state = apply_init(self.state, self.train_cfg.init)
            logger.info("fresh run: %d steps, checkpoints in %s", self.total_steps, self.checkpointer.directory)
        else:
            self.graphdef, abstract, self.state_shardings = abstract_train_state(
                self._build, self.filter, self.tx, self.seed, self.mesh)
            latest, self.state, position = self.checkpointer.restore_usable(
                abstract, with_data=True, fallback=self.train_cfg.checkpoint_fallback)
            changes = config_changes(self.checkpointer.saved_config(latest), self.config)
            if changes and not self.train_cfg.allow_config_change:
                raise ValueError(f"resuming from {self.checkpointer.directory}/{latest}: the config differs from the "
                                 f"one the checkpoint was written with in {'; '.join(changes)}. These fields fix the "
                                 "saved data position and the learning-rate schedule; restore them, use a new "
                                 "--workdir, or accept the change with --config.train.allow_config_change=True")
            if changes:
                logger.warning("resuming with a changed config (train.allow_config_change=True): %s",
                               "; ".join(changes))
            self._restore_position(position, f"{self.checkpointer.directory}/{latest}")
            self.writer.truncate(latest)
            logger.info("resumed from %s/%d (step %d of %d)", self.checkpointer.directory, latest,
                        int(self.state.step), self.total_steps)
        trainable, frozen = count_params(self.state.trainable), count_params(self.state.frozen)
        logger.info("parameters: %s trainable, %s frozen (%.2f%% trainable); mesh %s", f"{trainable:,}",
                    f"{frozen:,}", 100 * trainable / max(trainable + frozen, 1), dict(self.mesh.shape))
        logger.info("weight decay %g on trainable parameters: %s", self.train_cfg.weight_decay,
                    decay_summary(self.state.trainable, self.train_cfg.no_decay_roles))
        self.num_params = trainable + frozen
        self._train_step = make_train_step(self.graphdef, self.tx, self.schedule,
                                           grad_accum_steps=self.train_cfg.grad_accum_steps,
                                           balance_loss_weight=self.train_cfg.balance_loss_weight)

    def _budget_layout(self) -> dict[str, int]:
        """How a visual budget's row groups follow the step: one per device block of the batch axis and
        micro-batch."""
        return {"batch_shards": batch_shards(self.mesh), "grad_accum_steps": self.train_cfg.grad_accum_steps}

    def data_state(self, position: dict) -> dict:
        """The data position of all processes as one record (process 0 writes it): `position` is this process's
        iterator state; `batches` the number of global batches consumed."""
        return {"process_count": jax.process_count(), "packing": bool(self.config.data.packing),
                "batches": int(position["batches_emitted"]),
                "processes": distributed.allgather_json("data_state", position)}

    def _restore_position(self, saved: dict, where: str) -> None:
        """Puts the iterator at the saved position: each process's own state on the same process count; without
        packing, global batch `batches` on any other count (skip counters summed into process 0's)."""
        count, me = jax.process_count(), jax.process_index()
        if saved["process_count"] == count:
            self.iterator.set_state(saved["processes"][me])
            return
        if saved["packing"]:
            raise ValueError(f"resuming from {where}: it was written by {saved['process_count']} process(es) with "
                             f"data.packing=True, and this run has {count}; packed batches depend on the process "
                             "count, so resume on the same number of processes (or train without packing)")
        logger.info("resuming the data of %d process(es) on %d at global batch %d", saved["process_count"], count,
                    saved["batches"])
        self.iterator = pipeline.make_train_iterator(self.config.data, self.kind, start_batch=int(saved["batches"]),
                                                     **self._budget_layout())
        if me == 0:
            skips = [p["skips"] for p in saved["processes"]]
            merged = collections.Counter()
            for one in skips:
                merged.update(one["skipped"])
            self.iterator.skip_stats.load({"seen": sum(int(one["seen"]) for one in skips), "skipped": merged})

    def _preflight(self, batch: dict) -> None:
        data = self.config.data
        vocab = getattr(self.model_cfg, "vocab_size", None) or getattr(self.model_cfg.llm, "vocab_size")
        tokenizer = pipeline.prepare_tokenizer(data)
        preflight.check_batches([batch], tokenizer, data.template, vocab_size=vocab, **self.kind.preflight_counts())

    # --- the loop ------------------------------------------------------------------------------------------------
    def run(self, stop_at: int | None = None) -> dict[str, float]:
        """Trains to train.steps (or only up to step `stop_at`, then checkpoints and returns: a planned
        interruption, e.g. the end of a time slot; the same command later resumes exactly)."""
        try:
            if self.state is None:
                self.setup()
            return self._run(stop_at)
        except BaseException:
            self._abort()
            raise

    def _run(self, stop_at: int | None) -> dict[str, float]:
        start = int(self.state.step)
        jitted = None
        batch_spec = P(("data", "fsdp"))
        with _StopSignal() as stop, jax.set_mesh(self.mesh):
            self._last_log = (time.perf_counter(), start)
            for step in range(start, self.total_steps):
                position = self.iterator.get_state()  # what a stop before this step saves
                try:
                    batch = next(self.iterator)
                except StopIteration:
                    batch = None
                length = 0 if batch is None else int(batch["input_ids"].shape[1])
                votes = distributed.allgather_json("step", [length, stop.received, batch is None])
                if any(ended for _, _, ended in votes):
                    logger.warning("the training data ran out after step %d of %d (data.num_epochs=%s)", step,
                                   self.total_steps, self.config.data.num_epochs)
                    self._save(step, force=True, position=position)
                    break
                if any(signalled for _, signalled, _ in votes):
                    self._save(step, force=True, position=position)
                    self._stopped(step, "after SIGTERM")
                    return self.last_eval
                agreed = max(n for n, _, _ in votes)
                if agreed != length:  # all processes pad to the same bucket: they must run the same program
                    batch = self.iterator.layout.pad_to(batch, agreed)
                if step == start:
                    self._preflight(batch)
                counts = metrics_lib.batch_counts(batch)
                for key, value in counts.items():
                    self._counts[key] += value
                local = device_batch(batch)
                if jitted is None:
                    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in local.items()}
                    jitted = jit_train_step(self._train_step, self.state_shardings, shapes, self.mesh)
                global_batch = pipeline.to_global_batch(local, self.mesh, batch_spec)
                cpu_process.wait_for_inputs(global_batch, self.mesh)
                self.state, step_metrics = jitted(self.state, global_batch)
                done = step + 1
                self._pending.append((done, step_metrics, int(batch["input_ids"].shape[1]), counts))
                last = done == self.total_steps
                if done % self.train_cfg.log_every == 0 or last:
                    self._log()
                if self.train_cfg.eval_every and done % self.train_cfg.eval_every == 0 and not last:
                    self._evaluate(done)
                if done % self.train_cfg.checkpoint_every == 0 or last:
                    self._save(done)
                if self.checkpointer.reached_preemption(done) or done == stop_at:
                    self._save(done, force=True)
                    self._stopped(done, "")
                    return self.last_eval
            self.checkpointer.wait()
            self._report_newest()
            if self.train_cfg.eval_at_end:
                self._evaluate(int(self.state.step))
        self.close()
        return self.last_eval

    def _stopped(self, step: int, why: str) -> None:
        self.checkpointer.wait()
        logger.warning("stopped at step %d%s; the checkpoint is saved; rerun the same command to resume", step,
                       f" {why}" if why else "")
        self.close()

    def _abort(self) -> None:
        """On an error exit: waits for the pending checkpoint write (a failed one is logged and its partial
        directory removed), says which checkpoint is the newest complete one, releases the workdir."""
        try:
            self.checkpointer.wait()
        except Exception as e:  # the original error is the one to raise; this one is reported
            logger.error("the pending checkpoint write failed too: %s", e)
        self._report_newest()
        try:
            self.close()
        except Exception as e:
            logger.error("closing the checkpointer failed: %s", e)

    def _report_newest(self) -> None:
        newest = self.checkpointer.latest_step()
        if newest is None:
            logger.warning("no complete checkpoint in %s", self.checkpointer.directory)
        else:
            logger.info("newest complete checkpoint: step %d in %s (rerun the same command to resume from it)",
                        newest, self.checkpointer.directory)

    def _log(self) -> None:
        """Fetches the pending step metrics (the only host sync), stops on a non-finite loss, writes a record."""
        if not self._pending:
            return
        fetched = [(s, jax.device_get(m), length, counts) for s, m, length, counts in self._pending]
        self._pending = []
        self.checkpointer.check_for_errors()  # a failed background write stops the run now, not at the next save
        for step, values, _, _ in fetched:
            watched = {k: float(values[k]) for k in LOSS_KEYS if k in values}
            if int(values.get("visual_token_mismatch", 0)):
                raise ValueError(f"step {step}: {int(values['visual_token_mismatch'])} batch rows have a number of "
                                 "<IMG_CONTEXT> tokens different from their visual tokens; the prompt's image "
                                 "placeholders and the images/tiles in the batch must match (check the template's "
                                 "image token counts and the model's image_context_id)")
            if not all(math.isfinite(v) for v in watched.values()):
                raise NonFiniteLossError(f"non-finite loss at step {step} ({watched}); {self._finite_advice()}")
        step = fetched[-1][0]
        now = time.perf_counter()
        elapsed = now - self._last_log[0]
        steps = step - self._last_log[1]
        self._last_log = (now, step)
        scalars = metrics_lib.to_scalars({k: np.mean([np.asarray(v[k]) for _, v, _, _ in fetched], axis=0)
                                          for k in fetched[-1][1]})
        scalars["learning_rate"] = float(fetched[-1][1]["learning_rate"])
        processes = jax.process_count()
        seconds_per_step = elapsed / max(steps, 1)
        scalars["perf/seconds_per_step"] = seconds_per_step
        for key, value in self._counts.items():
            if value:
                scalars[f"perf/{key}_per_second"] = value * processes / max(elapsed, 1e-9)
        self._counts = dict.fromkeys(self._counts, 0.0)
        scalars.update(self.iterator.skip_stats.as_metrics())
        scalars.update(self.iterator.skip_stats.window_metrics())
        flops = np.mean([metrics_lib.train_flops_per_step(  # counts: this process's share, times the processes
            self.model_cfg, length, int(self.config.data.global_batch_size), self.num_params,
            {k: v * processes for k, v in counts.items()}) for _, _, length, counts in fetched])
        scalars["perf/tflops_per_second"] = flops / seconds_per_step / 1e12
        peak = metrics_lib.peak_flops_per_device(self.train_cfg.peak_flops_per_device)
        if peak:
            scalars["perf/mfu"] = flops / seconds_per_step / (peak * jax.device_count())
        self.writer.write(step, scalars)
        eta = seconds_per_step * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}", f"loss {scalars['loss']:.4f}", f"lr {scalars['learning_rate']:.2e}",
                 f"grad {scalars['grad_norm']:.3f}"]
        if "balance_loss" in scalars:
            parts.append(f"balance {scalars['balance_loss']:.3f}")
        parts.append(f"{scalars.get('perf/tokens_per_second', 0):,.0f} tok/s")
        if "perf/images_per_second" in scalars:
            parts.append(f"{scalars['perf/images_per_second']:.1f} img/s")
        if "perf/tiles_per_second" in scalars:
            parts.append(f"{scalars['perf/tiles_per_second']:.1f} tiles/s")
        parts.append(f"MFU {scalars['perf/mfu']:.1%}" if "perf/mfu" in scalars else "MFU n/a")
        parts += [f"{seconds_per_step:.2f} s/step", f"ETA {metrics_lib.format_seconds(eta)}"]
        logger.info(" | ".join(parts))

    def _evaluate(self, step: int) -> None:
        if not (self.config.data.eval_files or self.config.data.train_files):
            return
        self._log()
        started = time.perf_counter()
        if self._evaluator is None:
            self._evaluator = Evaluator(self.graphdef, self.config.data, self.kind,
                                        max_batches=self.train_cfg.eval_max_batches,
                                        max_new_tokens=self.train_cfg.eval_max_new_tokens)
        results = self._evaluator(self.state.trainable, self.state.frozen, self.mesh)
        results["eval/seconds"] = time.perf_counter() - started
        self.last_eval = results
        self.writer.write(step, results)
        summary = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in results.items()
                            if k.endswith("/accuracy"))
        logger.info("eval at step %d: exact match %.3f over %d answers%s (%.0f s)", step, results["eval/exact_match"],
                    int(results["eval/num"]), f"; per type: {summary}" if summary else "", results["eval/seconds"])
        if jax.process_index() == 0:
            (epath.Path(self.workdir) / "eval_results.json").write_text(json.dumps({"step": step, **results},
                                                                                   indent=1))

    def _finite_advice(self) -> str:
        newest = self.checkpointer.latest_step()
        where = (f"the newest checkpoint, step {newest} in {self.checkpointer.directory}, holds finite values (a "
                 "non-finite state is never saved)" if newest is not None else "no checkpoint was saved")
        return (f"{where}. Lower train.learning_rate or check the data, then rerun to resume from it, or from an "
                "older step with --config.train.resume_step=N")

    def _save(self, step: int, force: bool = False, position: dict | None = None) -> None:
        """Checkpoint `step`, with the data position after it (`position`, default: the iterator's now)."""
        self._log()  # never checkpoint a state whose pending losses were not checked
        if step in self.checkpointer.all_steps():
            return
        # The loss of step k is computed before step k's update: only the state itself shows an update that blew up.
        if not bool(_all_finite(self.state)):
            raise NonFiniteLossError(f"the parameters or optimizer state are not finite after step {step}; "
                                     f"checkpoint {step} is not written; {self._finite_advice()}")
        data = self.data_state(self.iterator.get_state() if position is None else position)
        if self.checkpointer.save(step, self.state, data, self.config.to_dict(), force=force):
            logger.info("checkpoint %d saving to %s", step, self.checkpointer.directory)

    def close(self) -> None:
        try:
            self.checkpointer.wait()
            self.checkpointer.close()
        finally:
            self.writer.close()
            self.lock.release()


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Writes the preset's synthetic set if it uses one, then trains; the workdir is locked throughout."""
    with WorkdirLock(workdir, jax.process_index() == 0):
        ensure_synthetic_data(config, workdir)
        return Trainer(config, workdir).run()
