#!/usr/bin/env bash
# A TPU pod slice: the same command on every worker VM; jax.distributed.initialize() finds the pod itself.
#   launch/tpu_pod.sh NAME ZONE --config configs/hico_7b.py:stage3 --workdir gs://bucket/runs/7b_s3
# The repository must be at the same path on every worker (e.g. cloned by a startup script), with its venv.
set -euo pipefail
NAME=$1; ZONE=$2; shift 2
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/hico_jax && HICO_DISTRIBUTED=1 .venv/bin/python -m hico_jax.train${ARGS}"
