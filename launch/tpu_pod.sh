#!/usr/bin/env bash
# A TPU VM pod slice: the same command on every worker; JAX detects the pod topology.
#   launch/tpu_pod.sh TPU_NAME ZONE --config configs/paper.py --workdir gs://bucket/run
# Assumes the repo is checked out at ~/ssm_jax on every worker (e.g. via an earlier
# `gcloud compute tpus tpu-vm ssh --worker=all --command "git clone ..."`).
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/ssm_jax && pip install -q -e . 'jax[tpu]' && SSM_DISTRIBUTED=auto ssm-jax train${args}"
