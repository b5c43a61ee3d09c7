#!/usr/bin/env bash
# Launch a leo_jax training run on every worker of a Cloud TPU VM slice (one process per host; JAX discovers the
# slice itself). Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=v ...]
# e.g. launch/tpu_pod.sh my-v5p-128 us-east5-a configs/leo_8b_sft.py gs://bucket/runs/leo_sft \
#        --config.data.train_files=/mnt/data/sft.jsonl --config.train.init.llm=/mnt/data/internlm2_7b_leo
# Checkpoints may go to gs:// (Orbax); annotation files, images and init checkpoints are read with local file I/O,
# so put them on each worker's disk or a gcsfuse mount.
# The repository is copied to every worker, its requirements installed (jax[tpu] of the pinned version), and the
# trainer started in the background with its log in ~/leo_jax_train.log on each worker. Re-running the same command
# resumes from the newest checkpoint in WORKDIR.
set -euo pipefail
if [ "$#" -lt 4 ]; then
  sed -n '2,11p' "$0"; exit 2
fi
tpu="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
repo="$(cd "$(dirname "$0")/.." && pwd)"
jax_version="$(sed -n 's/^jax==//p' "$repo/requirements.txt")"
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"; }

tar -C "$repo" --exclude .git --exclude '.venv' --exclude '.ci-venv' -czf /tmp/leo_jax_src.tgz .
gcloud compute tpus tpu-vm scp /tmp/leo_jax_src.tgz "$tpu":~/leo_jax_src.tgz --zone "$zone" --worker=all
ssh_all "mkdir -p ~/leo_jax && tar -C ~/leo_jax -xzf ~/leo_jax_src.tgz && cd ~/leo_jax && \
  python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements.txt \"jax[tpu]==$jax_version\""
ssh_all "cd ~/leo_jax && . .venv/bin/activate && nohup python -m leo_jax.train --config $config --workdir $workdir $* \
  > ~/leo_jax_train.log 2>&1 &"
echo "started on every worker of $tpu; follow with: gcloud compute tpus tpu-vm ssh $tpu --zone $zone --worker=0 --command 'tail -f ~/leo_jax_train.log'"
