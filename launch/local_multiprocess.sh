#!/usr/bin/env bash
# Several processes on this machine, each with its own CPU devices, joined by
# jax.distributed (for testing multi-host code without a cluster).
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS ssm-jax train --config ... --workdir ...
set -euo pipefail
nproc_=${1:?number of processes}; ndev=${2:?devices per process}; shift 2
port=${SSM_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < nproc_; i++)); do
  SSM_COORDINATOR="localhost:${port}" SSM_NUM_PROCESSES="$nproc_" SSM_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${ndev}" \
    "$@" > "${SSM_LOG_PREFIX:-/tmp/ssm_proc}${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
