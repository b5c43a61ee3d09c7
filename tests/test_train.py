"""Trainer: exact resume, cross-mesh restore, freezing, gradient accumulation, SIGTERM, kill during save, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from leo_jax.models.registry import build_model
from leo_jax.sharding import build_mesh
from leo_jax.train.checkpoint import Checkpointer
from leo_jax.train.config import TrainConfig
from leo_jax.train.loop import NonFiniteLossError, Trainer
from leo_jax.train.optimizer import TrainableFilter, decays, learning_rate_schedule
from leo_jax.train.state import abstract_train_state, create_train_state
from leo_jax.train.step import jit_train_step, make_train_step
from train_helpers import config_file, llm_train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(workdir: str) -> dict[int, dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_resume_is_exact(tmp_path):
    """Stopped at step 3 and resumed == uninterrupted: the same losses and parameters, bit for bit (the data order
    and the rng are restored with the state)."""
    straight = Trainer(llm_train_config(str(tmp_path / "a")), str(tmp_path / "a"))
    straight.run()
    resumed_dir = str(tmp_path / "b")
    Trainer(llm_train_config(resumed_dir), resumed_dir).run(stop_at=3)
    assert Checkpointer(os.path.join(resumed_dir, "checkpoints"), keep=3).latest_step() == 3
    resumed = Trainer(llm_train_config(resumed_dir), resumed_dir)
    resumed.setup()
    assert int(resumed.state.step) == 3
    resumed.run()
    a, b = read_metrics(str(tmp_path / "a")), read_metrics(resumed_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], f"step {step}: {a[step]['loss']} != {b[step]['loss']}"
        assert a[step]["grad_norm"] == b[step]["grad_norm"]
    assert a[1]["loss"] != a[6]["loss"]  # it trained
    for x, y in zip(host(straight.state), host(resumed.state)):
        np.testing.assert_array_equal(x, y)


def test_checkpoint_restores_on_other_meshes(tmp_path):
    """Written on 8 devices as (data 2, fsdp 4); restored as (data 2, fsdp 2, tensor 2) and on 1 device, with
    the target shardings and identical values."""
    workdir = str(tmp_path)
    config = llm_train_config(workdir, steps=2, checkpoint_every=2)
    config.mesh.ici.update(data=2, fsdp=4, tensor=1)
    trainer = Trainer(config, workdir)
    trainer.run()
    saved = host(trainer.state)
    kernel = trainer.state.trainable["layers"]["mlp"]["up_proj"]["kernel"].get_value()  # [layers, embed, mlp]
    assert kernel.shape == (2, 64, 128) and kernel.sharding.shard_shape(kernel.shape) == (2, 16, 128)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
    for mesh, shard in ((build_mesh({"ici": {"data": 2, "fsdp": 2, "tensor": 2}}), (2, 32, 64)),
                        (build_mesh(devices=jax.devices()[:1]), (2, 64, 128))):
        _, abstract, shardings = abstract_train_state(trainer._build, trainer.filter, trainer.tx, 0, mesh)
        restored = checkpointer.restore(2, abstract)
        for x, y in zip(saved, host(restored)):
            np.testing.assert_array_equal(x, y)
        for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
        up = restored.trainable["layers"]["mlp"]["up_proj"]["kernel"].get_value()
        assert up.sharding.shard_shape(up.shape) == shard and len(up.sharding.device_set) == mesh.size
    checkpointer.close()


def test_frozen_params_stay_bit_identical(tmp_path):
    """Frozen parameters pass through training unchanged and have no optimizer state; trainable ones change."""
    workdir = str(tmp_path)
    config = llm_train_config(workdir, steps=3, trainable=("layers/.*", "lm_head/.*"),
                              frozen=("layers/attn/.*",))
    trainer = Trainer(config, workdir)
    trainer.setup()
    frozen_before = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(trainer.state.frozen)}
    trainable_before = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(trainer.state.trainable)}
    assert {k[0] for k in frozen_before} == {"embed", "layers", "norm"}
    assert all(k[1] == "attn" for k in frozen_before if k[0] == "layers")
    trainer.run()
    for key, value in nnx.to_flat_state(trainer.state.frozen):
        np.testing.assert_array_equal(np.asarray(value.get_value()), frozen_before[key])
    for key, value in nnx.to_flat_state(trainer.state.trainable):
        assert not np.array_equal(np.asarray(value.get_value()), trainable_before[key]), key
    moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim]  # Adam mu and nu (not the counters)
    assert sum(x.size for x in moments) == 2 * sum(v.size for v in trainable_before.values())


def test_freezing_patterns_must_match(tmp_path):
    config = llm_train_config(str(tmp_path), frozen=("vision/.*",))
    with pytest.raises(ValueError, match=r"config.train.frozen: pattern 'vision/\.\*' matches no parameter"):
        Trainer(config, str(tmp_path))


def test_leo_mini_stage3_trains_only_cotr_lora_routers_projector():
    """The stage-3 patterns select exactly CoTR, projector and the MMoE routers / LoRA experts."""
    from leo_jax.config import load_config

    config = load_config("leo_mini_llama3_8b_stage3")
    train = TrainConfig.from_config(config.train)
    from leo_jax.configs import tiny_leo_mini

    model = nnx.eval_shape(lambda: build_model(tiny_leo_mini.get_config().model, nnx.Rngs(0)))
    _, trainable, frozen = nnx.split(model, nnx.All(nnx.Param, TrainableFilter(train.trainable, train.frozen)), ...)
    names = ["/".join(map(str, k)) for k, _ in nnx.to_flat_state(trainable)]
    assert {n.split("/")[0] for n in names} == {"cotr", "projector", "llm"}
    assert all("/mmoe/" in n for n in names if n.startswith("llm/"))
    assert any("/mmoe/router/" in n for n in names) and any("/mmoe/experts/" in n for n in names)
    frozen_names = ["/".join(map(str, k)) for k, _ in nnx.to_flat_state(frozen)]
    assert not any("/mmoe/" in n or n.startswith(("cotr", "projector")) for n in frozen_names)
    assert any(n.startswith("experts/") for n in frozen_names) and any(n.startswith("llm/embed") for n in frozen_names)


def test_grad_accumulation_matches_full_batch():
    """4 micro-batches inside the step == one full batch: gradients (read through an SGD step with lr 1) agree to
    2e-7 absolute (float32 summation order), on an 8-device (data, fsdp, tensor) mesh."""
    config = llm_train_config("/tmp")  # only the model section is used
    mesh = build_mesh({"ici": {"data": 2, "fsdp": 2, "tensor": 2}})
    train = TrainConfig(steps=1, learning_rate=1.0)
    tx = optax.sgd(1.0)
    schedule = learning_rate_schedule(train, 1)
    build = lambda rngs: build_model(config.model, rngs)  # noqa: E731
    filt = TrainableFilter((".*",), ())
    rng = np.random.default_rng(0)
    b, t = 16, 24
    ids = rng.integers(3, 500, (b, t)).astype(np.int32)
    segments = np.where(np.arange(t)[None] < rng.integers(8, t + 1, (b, 1)), 1, 0).astype(np.int32)
    batch = {"input_ids": ids, "labels": np.roll(ids, -1, 1), "segment_ids": segments,
             "loss_mask": (segments * (rng.random((b, t)) < 0.6)).astype(np.float32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
             "prompt_mask": np.zeros((b, t), bool)}
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    results = []
    for accum in (1, 4):
        graphdef, state, shardings = create_train_state(build, filt, tx, 0, mesh)
        before = host(state.trainable)
        step = jit_train_step(make_train_step(graphdef, tx, schedule, grad_accum_steps=accum,
                                              balance_loss_weight=0.05), shardings, shapes, mesh)
        with jax.set_mesh(mesh):
            state, metrics = step(state, batch)
        grads = [x - y for x, y in zip(before, host(state.trainable))]
        results.append((grads, jax.device_get(metrics)))
    (full, m_full), (accumulated, m_acc) = results
    worst = max(float(np.max(np.abs(x - y))) for x, y in zip(full, accumulated))
    assert worst <= 2e-7, worst
    assert max(float(np.max(np.abs(g))) for g in full) > 1e-3  # gradients are not trivially zero
    np.testing.assert_allclose(m_full["loss"], m_acc["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_full["grad_norm"], m_acc["grad_norm"], rtol=1e-5)


def test_cpu_train_step_compiles_for_smaller_temporaries():
    """On a CPU mesh the step compiles with XLA:CPU's memory-optimised scheduler (step.CPU_COMPILER_OPTIONS): its
    temporaries, which XLA:CPU maps in afresh on every call, are smaller than under the default scheduler."""
    config = llm_train_config("/tmp")  # only the model section is used
    mesh = build_mesh({"ici": {"data": 2, "fsdp": 4}})
    tx = optax.adamw(1e-3)
    graphdef, state, shardings = create_train_state(lambda rngs: build_model(config.model, rngs),
                                                    TrainableFilter((".*",), ()), tx, 0, mesh)
    b, t = 16, 24
    shapes = {k: jax.ShapeDtypeStruct((b, t), dtype) for k, dtype in (
        ("input_ids", np.int32), ("labels", np.int32), ("segment_ids", np.int32), ("loss_mask", np.float32),
        ("positions", np.int32), ("prompt_mask", bool))}
    schedule = learning_rate_schedule(TrainConfig(steps=1, learning_rate=1e-3), 1)
    step = jit_train_step(make_train_step(graphdef, tx, schedule, grad_accum_steps=1, balance_loss_weight=0.0),
                          shardings, shapes, mesh)
    with jax.set_mesh(mesh):
        lowered = step.lower(state, shapes)
        tuned = lowered.compile().memory_analysis().temp_size_in_bytes
        default = lowered.compile(compiler_options={"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"})
    assert tuned < default.memory_analysis().temp_size_in_bytes, (tuned, default.memory_analysis())


def test_schedule_and_weight_decay_mask():
    cfg = TrainConfig(steps=100, learning_rate=1.0, warmup_fraction=0.1, final_lr_fraction=0.1)
    schedule = learning_rate_schedule(cfg, 100)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(55), schedule(100)],
                               [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    constant = learning_rate_schedule(TrainConfig(steps=10, learning_rate=0.5, schedule="constant",
                                                  warmup_fraction=0.0), 10)
    assert float(constant(0)) == float(constant(9)) == 0.5
    config = llm_train_config("/tmp")
    model = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
    flat = {"/".join(map(str, k)): decays(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert flat["layers/mlp/up_proj/kernel"] and flat["embed/embedding"] and flat["lm_head/kernel"]
    assert not flat["layers/input_norm/scale"] and not flat["norm/scale"]


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    config = llm_train_config(str(tmp_path), learning_rate=float("inf"), grad_clip_norm=0.0, warmup_fraction=0.0,
                              schedule="constant")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 2"):
        Trainer(config, str(tmp_path)).run()
    assert Checkpointer(str(tmp_path / "checkpoints"), keep=3).latest_step() is None  # nothing bad was saved


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    env.pop("XLA_FLAGS", None)
    return env


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    config = config_file(str(tmp_path / "cfg.py"), workdir, steps=10_000, checkpoint_every=10_000, log_every=1)
    proc = subprocess.Popen([sys.executable, "-m", "leo_jax.train", "--config", config, "--workdir", workdir],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "SIGTERM" in output
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
    step = checkpointer.latest_step()
    assert step is not None and step >= 2
    checkpointer.close()
    trainer = Trainer(llm_train_config(workdir, steps=10_000, checkpoint_every=10_000), workdir)
    trainer.setup()
    assert int(trainer.state.step) == step
    assert trainer.iterator.get_state()["batches_emitted"] == step


def test_kill_during_save_keeps_the_last_good_checkpoint(tmp_path):
    """SIGKILL while step 4's checkpoint is being written (after the arrays, before the atomic finalize):
    step 2 stays the latest checkpoint and restores."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    script = textwrap.dedent(f"""
        import os, signal, sys
        import orbax.checkpoint as ocp
        from train_helpers import llm_train_config
        from leo_jax.train.loop import Trainer

        original = ocp.JsonCheckpointHandler._save_fn  # writes the data position and the config

        async def save(self, item, directory, *args, **kwargs):
            if "/4." in str(directory) or str(directory).rstrip("/").split("/")[-2].startswith("4"):
                os.kill(os.getpid(), signal.SIGKILL)  # the process dies in the middle of writing checkpoint 4
            return await original(self, item, directory, *args, **kwargs)

        ocp.JsonCheckpointHandler._save_fn = save
        Trainer(llm_train_config({workdir!r}, steps=6, checkpoint_every=2), {workdir!r}).run()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    entries = os.listdir(os.path.join(workdir, "checkpoints"))
    assert any(e.startswith("4") and "tmp" in e for e in entries), entries  # the interrupted save
    trainer = Trainer(llm_train_config(workdir, steps=6, checkpoint_every=2), workdir)
    assert trainer.checkpointer.latest_step() == 2
    trainer.setup()
    assert int(trainer.state.step) == 2
    trainer.run()  # and training continues from there
    assert int(trainer.state.step) == 6


def test_relative_workdir_checkpoints(tmp_path, monkeypatch):
    """`--workdir runs/x` (relative, as in the README) must checkpoint: Orbax itself only accepts absolute paths."""
    monkeypatch.chdir(tmp_path)
    config = llm_train_config("runs/rel", steps=2, checkpoint_every=1)
    Trainer(config, "runs/rel").run()
    assert sorted(p.name for p in (tmp_path / "runs/rel/checkpoints").iterdir() if p.name.isdigit())[-1] == "2"
