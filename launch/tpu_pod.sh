#!/usr/bin/env bash
# Runs an experiment on every host of a Cloud TPU VM slice (one process per host); the
# launcher sees TPU_WORKER_HOSTNAMES and calls jax.distributed.initialize().
#
#   launch/tpu_pod.sh my-v5p-256 us-east5-a pretrain_general --workdir=gs://BUCKET/pg
# The repository must be checked out and installed (`pip install -e .`) at ~/omnijax on
# every host (e.g. with the same ssh --worker=all command).
set -euo pipefail
TPU=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE EXPERIMENT[:ARG] [flags...]}
ZONE=${2:?zone}
EXP=${3:?experiment}
shift 3
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
  --command="cd ~/omnijax && python -m omnijax.launch --exp=$EXP $*"
