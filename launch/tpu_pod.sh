#!/usr/bin/env bash
# Runs an experiment on every host of a Cloud TPU VM slice (one process per host); the
# launcher sees TPU_WORKER_HOSTNAMES and calls jax.distributed.initialize().
#
#   launch/tpu_pod.sh my-v5p-256 us-east5-a pretrain_general --workdir=gs://BUCKET/pg
#   DATA_BUCKET=my-data launch/tpu_pod.sh ...   # first mounts gs://my-data at /mnt/data (gcsfuse)
#
# The repository must be checked out and installed (`pip install -e ".[tpu]"`) at ~/omnijax on
# every host (docs/pods.md). Flags are passed through to omnijax.launch as given.
set -euo pipefail
TPU=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE EXPERIMENT[:ARG] [flags...]}
ZONE=${2:?zone}
EXP=${3:?experiment}
shift 3
ARGS=$(printf ' %q' "--exp=$EXP" "$@")
MOUNT=""
if [[ -n "${DATA_BUCKET:-}" ]]; then
  MOUNT="sudo mkdir -p /mnt/data && sudo chown \$USER /mnt/data && \
(mountpoint -q /mnt/data || gcsfuse --implicit-dirs $(printf '%q' "$DATA_BUCKET") /mnt/data) && "
fi
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
  --command="${MOUNT}cd ~/omnijax && python -m omnijax.launch${ARGS}"
