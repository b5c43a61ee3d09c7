"""Failure paths of training: no checkpoint or user data is lost, and each failure is a prompt, clear error.

Read-only and full filesystems are real mounts (a read-only bind mount, a 1 MiB tmpfs); the tests that need them
skip when this process cannot mount (not root, or no mount namespace permission).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time

import ml_collections
import orbax.checkpoint as ocp
import pytest

from leo_jax.data import pipeline, synthetic, templates
from leo_jax.data.pipeline import DataSkipLimitError, SkipStats
from leo_jax.data.tokenizer import SYNTHETIC_TOKENIZER_PATH, load_tokenizer
from leo_jax.train.checkpoint import CheckpointReadError
from leo_jax.train.loop import NonFiniteLossError, Trainer, config_changes
from leo_jax.train.synthetic_data import ensure_synthetic_data
from leo_jax.train.workdir import StorageError, WorkdirLockedError
from train_helpers import llm_train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def metric_steps(workdir: str) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r]


def tensorboard_steps(workdir: str, tag: str = "loss") -> list[int]:
    """The steps TensorBoard shows for `tag`: every event file in name (= time) order, where a SessionLog START at
    step s hides the steps >= s read so far (TensorBoard's purge of a crashed run's orphaned events)."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    steps = []
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
        data, at = open(path, "rb").read(), 0
        while at < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                steps = [step for step in steps if step < event.step]
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def checkpoint_entries(workdir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@contextlib.contextmanager
def mounted(target: str, *args: str):
    """`mount ARGS target` for the block; skips the test when mounting is not permitted here."""
    os.makedirs(target, exist_ok=True)
    result = subprocess.run(["mount", *args, target], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({result.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", target], check=False)


def read_only(directory: str):
    """`directory` remounted read-only (a read-only bind mount of itself)."""
    @contextlib.contextmanager
    def block():
        with mounted(directory, "--bind", directory):
            if subprocess.run(["mount", "-o", "remount,bind,ro", directory]).returncode != 0:
                pytest.skip("cannot remount read-only here")
            yield directory
    return block()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step run with checkpoints 2, 4, 6; its text set holds 4 records with a typed template control
    token (<|eot_id|>), which are skipped."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    config = llm_train_config(workdir, steps=6, checkpoint_every=2)
    with open(config.data.train_files) as f:
        records = json.load(f)
    records += [{"id": f"bad-{i}", "conversations": [
        {"from": "human", "value": "what is one plus one?<|eot_id|><|start_header_id|>assistant"},
        {"from": "gpt", "value": "two"}]} for i in range(4)]
    with open(config.data.train_files, "w") as f:
        json.dump(records, f)
    Trainer(config, workdir).run()
    return workdir


def copy_run(trained: str, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    return workdir


def resume_config(trained: str, workdir: str, **train) -> ml_collections.ConfigDict:
    """The `trained` run's config for its copy in `workdir` (the same data file)."""
    config = llm_train_config(workdir, **{"steps": 6, "checkpoint_every": 2, **train})
    config.data.train_files = os.path.join(trained, "text.json")
    return config


# 1 ------------------------------------------------------------------------------------------------------------------
def test_error_exit_waits_for_the_pending_checkpoint(tmp_path, monkeypatch, caplog):
    """A data error right after `checkpoint 3 saving` (the write still in flight) leaves checkpoint 3 complete, and
    the log names it as the newest."""
    original = ocp.JsonCheckpointHandler._save_fn  # the background write of the data position and the config

    async def slow_save(self, *args, **kwargs):
        time.sleep(2.0)  # the background write is still running when the error comes
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", slow_save)
    workdir = str(tmp_path)
    trainer = Trainer(llm_train_config(workdir, steps=6, checkpoint_every=3), workdir)
    trainer.setup()
    iterator, calls = trainer.iterator, []

    class FailingAfterThree:
        def __init__(self):
            self.skip_stats, self.get_state = iterator.skip_stats, iterator.get_state

        def __next__(self):
            calls.append(1)
            if len(calls) == 4:
                raise DataSkipLimitError("skipped too many records (test)")
            return next(iterator)

    trainer.iterator = FailingAfterThree()
    with caplog.at_level(logging.INFO, logger="leo_jax.train"), pytest.raises(DataSkipLimitError):
        trainer.run()
    assert checkpoint_entries(workdir) == ["3"]  # complete, no orbax-checkpoint-tmp left
    assert "newest complete checkpoint: step 3" in caplog.text


# 2 ------------------------------------------------------------------------------------------------------------------
def test_explicit_data_files_win_over_the_synthetic_set(tmp_path):
    config = ml_collections.ConfigDict({"data": {"train_files": "/nonexistent/mine.json", "eval_files": ""},
                                        "synthetic": {"num": 4, "val_num": 2, "seed": 0, "image_size": 32,
                                                      "multi_image_fraction": 0.0, "dir": ""}})
    ensure_synthetic_data(config, str(tmp_path))
    assert config.data.train_files == "/nonexistent/mine.json" and config.data.eval_files == ""
    assert not (tmp_path / "synthetic").exists()  # not written, not used
    data = llm_train_config(str(tmp_path / "w")).data
    data.train_files = config.data.train_files
    with pytest.raises(FileNotFoundError, match="/nonexistent/mine.json"):  # the run fails instead of exiting 0
        pipeline.make_train_iterator(data, "llm", process_index=0, process_count=1)


# 3 ------------------------------------------------------------------------------------------------------------------
def test_read_only_checkpoint_directory_fails_at_once_naming_path_and_cause(tmp_path):
    workdir = str(tmp_path)
    config = llm_train_config(workdir, steps=2, checkpoint_every=1)
    checkpoints = os.path.join(workdir, "checkpoints")
    os.makedirs(checkpoints)
    started = time.monotonic()
    with read_only(checkpoints):
        with pytest.raises(StorageError, match=f"checkpoint directory {checkpoints} is not writable "
                                               r"\(Read-only file system\)"):
            Trainer(config, workdir).run()
    assert time.monotonic() - started < 60  # was: a 5-minute hang, then an uncaught TimeoutError


# 4 ------------------------------------------------------------------------------------------------------------------
def test_full_disk_stops_before_the_save_and_leaves_no_partial_directory(tmp_path):
    """Checkpoints on a 1 MiB tmpfs (the tiny LLM's train state is ~2 MiB): the run stops at the first save point
    (step 3, not at step 6), naming the directory and the missing space."""
    workdir = str(tmp_path)
    config = llm_train_config(workdir, steps=6, checkpoint_every=3)
    checkpoints = os.path.join(workdir, "checkpoints")
    with mounted(checkpoints, "-t", "tmpfs", "-o", "size=1m", "tmpfs"):
        with pytest.raises(StorageError, match=f"checkpoint 3: {checkpoints}: .* MiB free.*No space left"):
            Trainer(config, workdir).run()
        assert [e for e in os.listdir(checkpoints) if not e.startswith(".")] == []
    assert max(metric_steps(workdir)) == 3


# 5 ------------------------------------------------------------------------------------------------------------------
def test_second_trainer_on_a_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    workdir = str(tmp_path)
    config = llm_train_config(workdir, steps=2)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom leo_jax.train.workdir import WorkdirLock\n"
        f"WorkdirLock({workdir!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n")],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLockedError, match=f"in use by host .* pid {holder.pid} "):
            Trainer(config, workdir)
        assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="leo_jax.train"):
        trainer = Trainer(config, workdir)  # the holder died without releasing: a stale lock
    assert f"pid {holder.pid}" in caplog.text and "stale lock" in caplog.text
    with open(os.path.join(workdir, ".lock")) as f:
        assert f"pid {os.getpid()} " in f.read()
    trainer.close()


# 6 ------------------------------------------------------------------------------------------------------------------
def test_a_non_finite_update_is_never_checkpointed(tmp_path):
    """lr = inf: step 1's loss is finite but its update is not; checkpoint 1 must not be written."""
    config = llm_train_config(str(tmp_path), learning_rate=float("inf"), grad_clip_norm=0.0, warmup_fraction=0.0,
                              schedule="constant", checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match="not finite after step 1; checkpoint 1 is not written"):
        Trainer(config, str(tmp_path)).run()
    assert checkpoint_entries(str(tmp_path)) == []


def test_resume_step_resumes_from_an_older_checkpoint(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    trainer = Trainer(resume_config(trained, workdir, resume_step=4), workdir)
    trainer.setup()
    assert int(trainer.state.step) == 4 and trainer.iterator.get_state()["batches_emitted"] == 4
    assert checkpoint_entries(workdir) == ["2", "4"]
    assert [e.split("-")[0] for e in os.listdir(os.path.join(workdir, "checkpoints_set_aside"))] == ["6"]
    assert metric_steps(workdir) == [1, 2, 3, 4]  # 10: the records after the resumed step are dropped
    trainer.run()
    assert metric_steps(workdir) == [1, 2, 3, 4, 5, 6]  # no duplicates
    assert tensorboard_steps(workdir) == [1, 2, 3, 4, 5, 6]  # the first run's 5 and 6 are purged
    assert checkpoint_entries(workdir) == ["2", "4", "6"]
    with pytest.raises(ValueError, match=r"resume_step=5: there is no checkpoint 5 .*\[2, 4, 6\]"):
        Trainer(resume_config(trained, workdir, resume_step=5), workdir).run()


# 7 ------------------------------------------------------------------------------------------------------------------
def corrupt(step_dir: str) -> None:
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, caplog):
    workdir = copy_run(trained, tmp_path)
    corrupt(os.path.join(workdir, "checkpoints", "6"))
    with caplog.at_level(logging.WARNING, logger="leo_jax.train"):
        trainer = Trainer(resume_config(trained, workdir), workdir)
        trainer.setup()
    assert int(trainer.state.step) == 4
    assert f"checkpoint {workdir}/checkpoints/6 cannot be read" in caplog.text
    assert checkpoint_entries(workdir) == ["2", "4"]
    assert [e.split("-")[:2] for e in os.listdir(os.path.join(workdir, "checkpoints_set_aside"))] == [
        ["6", "unreadable"]]
    trainer.close()


def test_corrupt_checkpoint_without_fallback_is_a_short_clear_error(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    corrupt(os.path.join(workdir, "checkpoints", "6"))
    with pytest.raises(CheckpointReadError, match=f"checkpoint {workdir}/checkpoints/6 cannot be read") as error:
        Trainer(resume_config(trained, workdir, checkpoint_fallback=False), workdir).run()
    assert len(str(error.value)) < 700 and "\n" not in str(error.value)
    assert checkpoint_entries(workdir) == ["2", "4", "6"]  # nothing moved without the fallback


# 8 ------------------------------------------------------------------------------------------------------------------
def test_windowed_skip_limit_catches_a_bad_shard_late_in_a_run():
    """1000 good records, then bad ones: the cumulative fraction stays far below its 90% limit, the window of 100
    (limit 50%) stops the run at the 51st bad record in a row."""
    stats = SkipStats(0.9, 10, window=100, max_window_skip_fraction=0.5)
    for _ in range(1000):
        stats.record_ok()
    for i in range(50):
        stats.record_skip("missing_image", f"shard.jsonl:{i}", "no such file")
    assert stats.window_metrics() == {"data/window_skip_fraction": 0.5}
    restored = SkipStats(0.9, 10, window=100, max_window_skip_fraction=0.5)
    restored.load(json.loads(json.dumps(stats.state())))  # the window travels in the iterator state
    for s in (stats, restored):
        with pytest.raises(DataSkipLimitError, match="skipped 51 of the last 100 records"):
            s.record_skip("missing_image", "shard.jsonl:50", "no such file")


def test_skip_counts_reach_metrics_jsonl(trained):
    with open(os.path.join(trained, "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if "loss" in r][-1]
    # Without packing a skipped record leaves its row empty (rows are a function of the global batch index), so the
    # 6 steps x 8 rows read exactly 48 records, the skipped ones included.
    assert last["data/records_seen"] == 6 * 8
    assert last["data/records_skipped"] == last["data/skipped/bad_conversation"] >= 1
    assert last["data/window_skip_fraction"] == last["data/records_skipped"] / last["data/records_seen"]


# 9 ------------------------------------------------------------------------------------------------------------------
def test_resume_refuses_config_changes_that_move_the_data_or_the_schedule(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    config = resume_config(trained, workdir, steps=8)
    config.data.seed = 1
    with pytest.raises(ValueError, match=r"data.seed: 0 -> 1; train.steps: 6 -> 8.*allow_config_change=True"):
        Trainer(config, workdir).run()
    config.train.allow_config_change = True
    trainer = Trainer(config, workdir)
    trainer.setup()
    assert int(trainer.state.step) == 6
    trainer.close()


def test_a_visual_budget_change_is_a_resume_change_and_older_checkpoints_read_as_unbudgeted(tmp_path):
    """The budget decides which records a batch holds, so it fixes the data position like the batch size; a
    checkpoint written before the field existed ran every slot, i.e. budget -1."""
    current = llm_train_config(str(tmp_path))
    saved = current.to_dict()
    del saved["data"]["visual_budget"]
    assert config_changes(saved, current) == []
    current.data.visual_budget = 64
    assert config_changes(saved, current) == ["data.visual_budget: -1 -> 64"]


# 10 -----------------------------------------------------------------------------------------------------------------
def test_read_only_workdir_is_a_clear_error(tmp_path):
    workdir = str(tmp_path / "run")
    config = llm_train_config(workdir, steps=2)
    with read_only(workdir):
        with pytest.raises(StorageError, match=f"work directory {workdir} is not writable "
                                               r"\(Read-only file system\)"):
            Trainer(config, workdir)


def test_typed_control_tokens_are_rejected_like_image_tokens():
    tokenizer = load_tokenizer(SYNTHETIC_TOKENIZER_PATH)
    templates.setup_tokenizer(tokenizer, "llama3")
    typed = [{"from": "human", "value": "hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nsure"},
             {"from": "gpt", "value": "two"}]
    with pytest.raises(ValueError, match="'<|start_header_id|>', a control token of template 'llama3'"):
        templates.encode_conversation(typed, tokenizer, "llama3", [])
    clean = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "two"}]
    assert len(templates.encode_conversation(clean, tokenizer, "llama3", []).input_ids) > 0


def test_synthetic_files_are_written_atomically(tmp_path, monkeypatch):
    """A writer that dies in the middle of data.json leaves no data.json (so the set is regenerated), no temp file."""
    real_dump = json.dump

    def dying_dump(value, f, **kwargs):
        f.write("[{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", dying_dump)
    with pytest.raises(OSError):
        synthetic.write_dataset(str(tmp_path), 4, seed=0, val_num=2, image_size=32)
    monkeypatch.setattr(json, "dump", real_dump)
    assert not (tmp_path / "data.json").exists()
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in tmp_path.rglob("*.png"))
