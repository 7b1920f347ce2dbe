#!/usr/bin/env bash
# A TPU VM pod slice: the same command on every worker; JAX detects the pod topology.
#   launch/tpu_pod.sh TPU_NAME ZONE --config configs/paper.py --workdir gs://bucket/run
# Assumes the repo is checked out at ~/ssm_jax on every worker (e.g. via an earlier
# `gcloud compute tpus tpu-vm ssh --worker=all --command "git clone ..."`).
# The workers share no disk: --workdir and data.path on gs:// (the gcs extra is installed);
# SSM_JAX_CACHE_DIR, if set here (e.g. gs://bucket/jax_cache), is passed on to every worker.
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
args=$(printf ' %q' "$@")
cache=${SSM_JAX_CACHE_DIR:+SSM_JAX_CACHE_DIR=$(printf '%q' "$SSM_JAX_CACHE_DIR") }
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/ssm_jax && pip install -q -e '.[gcs]' 'jax[tpu]' && ${cache}SSM_DISTRIBUTED=auto ssm-jax train${args}"
