#!/usr/bin/env bash
# A plain JobSet manifest for GKE users without XPK: one pod per host, from the image that ./Dockerfile builds.
# Prints the manifest with --dry-run, else applies it with kubectl. Needs the JobSet controller in the cluster.
#
# Usage: launch/jobset.sh [--dry-run] --image IMAGE --hosts N [--name NAME] [--tpu TYPE --topology TOPO |
#                         --gpus-per-host G] [--port P] CONFIG WORKDIR [TRAINER_ARGS...]
#   --tpu TYPE        GKE TPU accelerator, e.g. tpu-v5p-slice or tpu-v6e-slice (JAX detects the slice itself)
#   --topology TOPO   TPU topology, e.g. 4x4x4 (v5p-128: 16 hosts of 4 chips)
#   --chips-per-host  TPU chips per host (default 4)
#   --gpus-per-host   GPU hosts instead: G GPUs each; the pods get JAX_COORDINATOR_ADDRESS (pod 0 of the job),
#                     JAX_NUM_PROCESSES and JAX_PROCESS_ID (the pod's completion index)
#   --port            coordinator port on GPU hosts (default 1234)
#   WORKDIR           gs://bucket/path
# Example:
#   launch/jobset.sh --dry-run --image IMAGE --hosts 16 --tpu tpu-v5p-slice --topology 4x4x4 \
#     leo_8b_sft gs://bucket/runs/leo_sft > leo_sft.yaml && kubectl apply -f leo_sft.yaml
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

dry_run=0; image=""; hosts=""; name=""; tpu=""; topology=""; chips=4; gpus=""; port=1234
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --image) image="${2:?--image needs an image}"; shift 2 ;;
    --hosts) hosts="${2:?--hosts needs a number}"; shift 2 ;;
    --name) name="${2:?--name needs a name}"; shift 2 ;;
    --tpu) tpu="${2:?--tpu needs an accelerator}"; shift 2 ;;
    --topology) topology="${2:?--topology needs a topology}"; shift 2 ;;
    --chips-per-host) chips="${2:?--chips-per-host needs a number}"; shift 2 ;;
    --gpus-per-host) gpus="${2:?--gpus-per-host needs a number}"; shift 2 ;;
    --port) port="${2:?--port needs a number}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "jobset.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ -z "$image" || -z "$hosts" || $# -lt 2 ]]; then
  echo "jobset.sh: needs --image, --hosts, CONFIG and WORKDIR (see --help)" >&2
  exit 2
fi
if [[ -n "$tpu" && -n "$gpus" ]] || [[ -z "$tpu" && -z "$gpus" ]]; then
  echo "jobset.sh: choose one of --tpu TYPE --topology TOPO or --gpus-per-host G" >&2
  exit 2
fi
if [[ -n "$tpu" && -z "$topology" ]]; then
  echo "jobset.sh: --tpu needs --topology (e.g. 4x4x4)" >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
[[ -n "$name" ]] || name="leo-$(basename "${config%.py}" | tr '_.' '--' | cut -c1-24)"

# One JSON string (valid YAML) per argument, so every argument keeps its exact text.
json_str() {
  local s="$1"
  s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; s="${s//$'\t'/\\t}"; s="${s//$'\n'/\\n}"
  printf '"%s"' "$s"
}
args=(python -m leo_jax.train --config "$config" --workdir "$workdir" "$@")
command_list="$(for a in "${args[@]}"; do printf '%s, ' "$(json_str "$a")"; done)"
command_list="[${command_list%, }]"

pod_extra=()  # lines under the pod spec (12 spaces) and the container (14 spaces), by accelerator
container_extra=()
if [[ -n "$tpu" ]]; then
  pod_extra+=("            nodeSelector:"
              "              cloud.google.com/gke-tpu-accelerator: $tpu"
              "              cloud.google.com/gke-tpu-topology: $topology")
  resources="google.com/tpu: $chips"
else
  resources="nvidia.com/gpu: $gpus"
  container_extra+=("              env:"
                    "              - {name: JAX_COORDINATOR_ADDRESS, value: \"$name-workers-0-0.$name:$port\"}"
                    "              - {name: JAX_NUM_PROCESSES, value: \"$hosts\"}"
                    "              - name: JAX_PROCESS_ID"
                    "                valueFrom:"
                    "                  fieldRef: {fieldPath: \"metadata.annotations['batch.kubernetes.io/job-completion-index']\"}")
fi

manifest="$(cat <<YAML
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: $name
spec:
  failurePolicy:
    maxRestarts: 3
  network:
    enableDNSHostnames: true
  replicatedJobs:
  - name: workers
    replicas: 1
    template:
      spec:
        parallelism: $hosts
        completions: $hosts
        completionMode: Indexed
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            terminationGracePeriodSeconds: 300
$(printf '%s\n' "${pod_extra[@]}")
            containers:
            - name: trainer
              image: $image
              command: $command_list
              resources:
                limits: {$resources}
$(printf '%s\n' "${container_extra[@]}")
YAML
)"
manifest="$(printf '%s\n' "$manifest" | sed '/^$/d')"

if ((dry_run)); then
  printf '%s\n' "$manifest"
else
  printf '%s\n' "$manifest" | kubectl apply -f -
fi
