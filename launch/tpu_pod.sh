#!/usr/bin/env bash
# Start (or resume) a leo_jax training run on every worker of a Cloud TPU VM slice: one process per host, and JAX
# detects the slice by itself (no coordinator settings needed).
#
# Usage: launch/tpu_pod.sh [--dry-run] [--python VERSION] TPU_NAME ZONE CONFIG WORKDIR [TRAINER_ARGS...]
#   --dry-run         print the commands (one per line, shell-quoted) instead of running them
#   --python VERSION  Python for the workers' environment (default 3.11); uv installs it when the image lacks it
#   CONFIG            preset name (leo_8b_sft) or a path inside the repository
#   WORKDIR           checkpoints, metrics and TensorBoard: gs://bucket/path or a directory on every worker
#   TRAINER_ARGS      passed to `python -m leo_jax.train` with their quoting intact, e.g.
#                     --config.data.train_files=/mnt/data/sft.jsonl "--config.train.init={'llm': '/mnt/data/llm'}"
# Example:
#   launch/tpu_pod.sh my-v5p-128 us-east5-a leo_8b_sft gs://bucket/runs/leo_sft \
#     --config.data.train_files=/mnt/data/sft.jsonl "--config.train.init={'llm': '/mnt/data/internlm2_7b'}"
# The repository is copied to every worker, a uv-managed environment with the pinned requirements and jax[tpu] is
# created there, and the trainer runs in the background, logging to ~/leo_jax_train.log on each worker. Re-running
# the same command resumes from the newest checkpoint in WORKDIR.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

dry_run=0
python_version=3.11
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --python) python_version="${2:?--python needs a version}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "tpu_pod.sh: unknown option $1 (options come before TPU_NAME; see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 4 ]]; then
  usage >&2
  exit 2
fi
tpu="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4

repo="$(cd "$(dirname "$0")/.." && pwd)"
jax_version="$(sed -n 's/^jax==//p' "$repo/requirements.txt")"

# Runs a command, or prints it shell-quoted on one line in a dry run.
run() {
  if ((dry_run)); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

quoted_train="$(printf '%q ' python -m leo_jax.train --config "$config" --workdir "$workdir" "$@")"
setup="mkdir -p ~/leo_jax && tar -C ~/leo_jax -xzf ~/leo_jax_src.tgz && cd ~/leo_jax && \
(command -v uv >/dev/null || python3 -m pip install --user -q uv) && export PATH=\$HOME/.local/bin:\$PATH && \
uv venv -q --allow-existing --python $python_version .venv && . .venv/bin/activate && \
uv pip install -q -r requirements.txt 'jax[tpu]==$jax_version'"
start="cd ~/leo_jax && . .venv/bin/activate && nohup ${quoted_train}> ~/leo_jax_train.log 2>&1 &"

archive="${TMPDIR:-/tmp}/leo_jax_src.$$.tgz"
run tar -C "$repo" --exclude .git --exclude .venv --exclude .ci-venv --exclude runs -czf "$archive" .
run gcloud compute tpus tpu-vm scp "$archive" "$tpu:~/leo_jax_src.tgz" --zone "$zone" --worker=all
run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$setup"
run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$start"
echo "follow the log: gcloud compute tpus tpu-vm ssh $tpu --zone $zone --worker=0 --command 'tail -f ~/leo_jax_train.log'"
