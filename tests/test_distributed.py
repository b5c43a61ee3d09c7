"""Multi-process start-up: settings resolution, two real processes joined on localhost, and clear errors."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from leo_jax.train import distributed
from leo_jax.train.distributed import DistributedStartError, resolve_process_group

REPO = Path(__file__).resolve().parent.parent

JOIN_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from leo_jax.train import distributed
    if len(sys.argv) > 1:
        group = distributed.resolve_process_group(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    else:
        group = distributed.resolve_process_group()
    distributed.initialize(group, timeout_s=120)
    print(distributed.describe())
    gathered = multihost_utils.process_allgather(np.array([jax.process_index() + 1]))
    print("gathered", sorted(int(v) for v in np.ravel(gathered)))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(REPO), **extra)
    return env


def test_explicit_arguments_win_over_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "other:1", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "7"}
    group = resolve_process_group("host:1234", 2, 1, environ=env)
    assert (group.mode, group.coordinator_address, group.num_processes, group.process_id) == \
        ("explicit", "host:1234", 2, 1)
    group = resolve_process_group(environ=env)
    assert (group.coordinator_address, group.num_processes, group.process_id) == ("other:1", 8, 7)


def test_nothing_given_is_a_single_process_outside_a_cluster(monkeypatch):
    monkeypatch.setattr(distributed, "detected_cluster", lambda: None)
    assert resolve_process_group(environ={}).mode == "single"
    monkeypatch.setattr(distributed, "detected_cluster", lambda: "SlurmCluster")
    group = resolve_process_group(environ={})
    assert (group.mode, group.cluster) == ("cluster", "SlurmCluster")


def test_slurm_environment_is_detected():
    slurm = {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    old = {k: os.environ.get(k) for k in slurm}
    os.environ.update(slurm)
    try:
        assert distributed.detected_cluster() == "SlurmCluster"
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.parametrize("args, message", [
    (("h:1", 2, 2), "process_id=2 is out of range for num_processes=2"),
    (("h:1", 2, -1), "out of range"),
    (("h:1", 0, 0), "num_processes=0 must be at least 1"),
    (("h:1", None, 0), "missing: ['--num_processes / JAX_NUM_PROCESSES']"),
    (("nohostport", 2, 0), "must look like HOST:PORT"),
])
def test_bad_settings_are_clear_errors(args, message):
    with pytest.raises(DistributedStartError) as e:
        resolve_process_group(*args, environ={})
    assert message in str(e.value)


def test_non_integer_environment_value_is_named():
    with pytest.raises(DistributedStartError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        resolve_process_group(environ={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                                       "JAX_PROCESS_ID": "0"})


def test_two_processes_join_by_flags_and_by_environment():
    """Process 0 gets flags, process 1 the environment variables; both see 2 processes x 2 devices and gather."""
    address = f"127.0.0.1:{_free_port()}"
    p0 = subprocess.Popen([sys.executable, "-c", JOIN_SCRIPT, address, "2", "0"], env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    p1 = subprocess.Popen([sys.executable, "-c", JOIN_SCRIPT], text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                                                             JAX_PROCESS_ID="1"))
    outs = [p.communicate(timeout=240)[0] for p in (p0, p1)]
    for i, (p, out) in enumerate(zip((p0, p1), outs)):
        assert p.returncode == 0, out
        assert f"process {i} of 2, 2 local / 4 global cpu devices" in out, out
        assert "gathered [1, 2]" in out, out


def test_unreachable_coordinator_is_an_error_not_a_hang():
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "leo_jax.train", "--config", "tiny_leo_mini_train", "--workdir",
                           "unused", "--coordinator_address", address, "--num_processes", "2", "--process_id", "1",
                           "--distributed_timeout", "3"], env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr
    assert f"the coordinator at {address} did not answer within 3 s" in proc.stderr
    assert time.monotonic() - start < 120


def test_process_id_out_of_range_from_the_cli():
    proc = subprocess.run([sys.executable, "-m", "leo_jax.train", "--config", "tiny_leo_mini_train", "--workdir",
                           "unused"], env=_env(JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2",
                                               JAX_PROCESS_ID="5"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr
    assert "process_id=5 is out of range for num_processes=2 (valid: 0..1)" in proc.stderr
