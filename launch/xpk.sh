#!/usr/bin/env bash
# Start (or resume) a leo_jax training run on a GKE cluster with XPK (`pip install xpk`), from the image that the
# repository's Dockerfile builds. XPK creates one pod per host; JAX detects the TPU slice (or, on GPUs, XPK's
# coordinator environment) by itself.
#
# Usage: launch/xpk.sh [--dry-run] --cluster NAME --device-type TYPE --image IMAGE [--workload NAME]
#                      [--num-slices N] CONFIG WORKDIR [TRAINER_ARGS...]
#   --device-type     TPU slice (v5p-128, v6e-256, ...) or GPU machine type (h100-80gb-8, ...), as xpk names them
#   --image           the image built from ./Dockerfile and pushed, e.g. us-docker.pkg.dev/PROJECT/leo/leo_jax:v1
#   --workload        workload name (default leo-<config>-<time>)
#   --num-slices      TPU slices (default 1; more than 1 spans slices over DCN: set config.mesh.dcn)
#   --dry-run         print the xpk command (shell-quoted) instead of running it
#   WORKDIR           gs://bucket/path (the pods share nothing else)
# Example:
#   docker build --build-arg ACCELERATOR=tpu -t IMAGE . && docker push IMAGE
#   launch/xpk.sh --cluster my-cluster --device-type v5p-128 --image IMAGE leo_8b_sft gs://bucket/runs/leo_sft \
#     --config.data.train_files=/gcs/data/sft.jsonl
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

dry_run=0; cluster=""; device_type=""; image=""; workload=""; num_slices=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --cluster) cluster="${2:?--cluster needs a name}"; shift 2 ;;
    --device-type) device_type="${2:?--device-type needs a type}"; shift 2 ;;
    --image) image="${2:?--image needs an image}"; shift 2 ;;
    --workload) workload="${2:?--workload needs a name}"; shift 2 ;;
    --num-slices) num_slices="${2:?--num-slices needs a number}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "xpk.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
missing=()
[[ -n "$cluster" ]] || missing+=(--cluster)
[[ -n "$device_type" ]] || missing+=(--device-type)
[[ -n "$image" ]] || missing+=(--image)
if [[ ${#missing[@]} -gt 0 || $# -lt 2 ]]; then
  [[ ${#missing[@]} -gt 0 ]] && echo "xpk.sh: missing ${missing[*]}" >&2
  [[ $# -lt 2 ]] && echo "xpk.sh: give CONFIG and WORKDIR" >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
if [[ -z "$workload" ]]; then
  workload="leo-$(basename "${config%.py}" | tr '_.' '--' | cut -c1-24)-$(date +%m%d%H%M)"
fi

train="$(printf '%q ' python -m leo_jax.train --config "$config" --workdir "$workdir" "$@")"
cmd=(xpk workload create --cluster "$cluster" --workload "$workload" --device-type "$device_type"
     --num-slices "$num_slices" --docker-image "$image" --command "${train% }")
if ((dry_run)); then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
else
  "${cmd[@]}"
fi
