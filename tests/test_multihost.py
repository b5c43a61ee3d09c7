"""Multi-process training through the real CLI: 2 processes x 4 CPU devices on localhost (gloo collectives) against
1 process x 8 devices with the same global batch; resume across process counts; SIGTERM to one process."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from train_helpers import config_file

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 1500
# Loss tolerance between process counts: the programs are the same, only the cross-process all-reduce (gloo) sums
# in another order, so the losses agree to float32 round-off.
RTOL = 1e-5

LEO_MINI = ["--config", "tiny_leo_mini_train", "--config.synthetic.num=64", "--config.synthetic.val_num=16",
            "--config.data.global_batch_size=8", "--config.data.eval_batch_size=8", "--config.train.steps=4",
            "--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.train.eval_every=2",
            "--config.train.eval_max_batches=1", "--config.train.eval_at_end=False"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(local_devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices} "
                         "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                         "--xla_cpu_collective_timeout_seconds=900",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), PYTHONUNBUFFERED="1")
    return env


def _start(workdir: Path, processes: int, args: list[str]) -> list[subprocess.Popen]:
    """`processes` CLI processes on localhost sharing 8 CPU devices; their output goes to workdir/../<name>.p<i>.log."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(processes):
        group = ["--coordinator_address", address, "--num_processes", str(processes), "--process_id", str(i)]
        log = open(workdir.parent / f"{workdir.name}.p{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "leo_jax.train", "--workdir", str(workdir), *args,
                                       *(group if processes > 1 else [])], env=_env(8 // processes), stdout=log,
                                      stderr=subprocess.STDOUT, cwd=workdir.parent))
    return procs


def _finish(workdir: Path, procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for i, p in enumerate(procs):
        try:
            p.wait(timeout=TIMEOUT_S)
        finally:
            for other in procs:
                if other.poll() is None:
                    other.kill()
        outs.append((workdir.parent / f"{workdir.name}.p{i}.log").read_text())
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{outs[-1][-4000:]}"
    return outs


def _losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _checkpoints(workdir: Path) -> list[int]:
    return sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny LEO-MINI, 4 steps, checkpoints at 2 and 4, evaluation at step 2: 1 x 8 devices and 2 x 4 devices run
    in parallel on one synthetic set, written here first."""
    root = tmp_path_factory.mktemp("multihost")
    from leo_jax.data import synthetic  # the same set the preset would write, once, for both runs

    synthetic.write_dataset(str(root / "synthetic"), 64, 0, val_num=16, image_size=64, multi_image_fraction=0.0,
                            caption_fraction=0.3)
    args = LEO_MINI + [f"--config.synthetic.dir={root / 'synthetic'}"]
    one, two = root / "one", root / "two"
    started = [(one, _start(one, 1, args)), (two, _start(two, 2, args))]
    logs = {w.name: _finish(w, p) for w, p in started}
    return root, args, logs


def test_two_processes_train_like_one(runs):
    root, _, logs = runs
    one, two = _losses(root / "one"), _losses(root / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=RTOL)
    print("max |loss(2 x 4) - loss(1 x 8)|:", max(abs(one[s] - two[s]) for s in one))
    assert _checkpoints(root / "one") == _checkpoints(root / "two") == [2, 4]
    # The in-training evaluation ran on both processes and gathered every answer of the one eval batch.
    for name in ("one", "two"):
        results = json.loads((root / name / "eval_results.json").read_text())
        assert results["step"] == 2 and results["eval/num"] == 8.0, results
    # On CPU the CLI runs with leo_jax.train.cpu_process's settings.
    assert "CPU process: glibc keeps freed memory" in logs["one"][0]
    # Only process 0 logs progress; process 1 reports warnings and errors only.
    assert "step 4/4" in logs["two"][0] and "step 4/4" not in logs["two"][1]


@pytest.mark.parametrize("source, processes", [("two", 1), ("one", 2)])
def test_resume_on_another_process_count(runs, source, processes):
    """Checkpoint 2 of the 2-process run resumes on 1 process (and of the 1-process run on 2) and continues with
    the losses of the uninterrupted run."""
    root, args, _ = runs
    workdir = root / f"{source}-on-{processes}"
    shutil.copytree(root / source, workdir)
    _finish(workdir, _start(workdir, processes, args + ["--config.train.resume_step=2"]))
    reference, resumed = _losses(root / "one"), _losses(workdir)
    assert sorted(resumed) == [1, 2, 3, 4]  # 1, 2 from before (kept), 3, 4 trained after the resume
    np.testing.assert_allclose([resumed[3], resumed[4]], [reference[3], reference[4]], rtol=RTOL)
    assert _checkpoints(workdir) == [2, 4]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """SIGTERM to process 1 only: both agree on the step, the checkpoint of that step is written, both exit 0."""
    workdir = tmp_path / "run"
    config = config_file(str(tmp_path / "config.py"), str(tmp_path / "data"), steps=10000, checkpoint_every=10000,
                         log_every=1)
    procs = _start(workdir, 2, ["--config", config])
    deadline = time.monotonic() + TIMEOUT_S
    while not (workdir / "metrics.jsonl").exists() or len(_losses(workdir)) < 2:  # past compilation
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not start"
        time.sleep(1)
    procs[1].send_signal(signal.SIGTERM)
    outs = _finish(workdir, procs)
    stopped = []
    for out in outs:
        line = next(line for line in out.splitlines() if "stopped at step" in line)
        stopped.append(int(line.split("stopped at step ")[1].split()[0]))
        assert "after SIGTERM" in line
    assert stopped[0] == stopped[1] and stopped[0] >= 2
    assert _checkpoints(workdir) == [stopped[0]]
