#!/usr/bin/env bash
# Several processes on this machine, each with its own CPU devices, joined by
# jax.distributed (for testing multi-host code without a cluster).
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS ssm-jax train --config ... --workdir ...
set -euo pipefail
nproc_=${1:?number of processes}; ndev=${2:?devices per process}; shift 2
port=${SSM_PORT:-$((20000 + RANDOM % 20000))}
prefix=${SSM_LOG_PREFIX:-/tmp/ssm_proc}
echo "${nproc_} processes x ${ndev} device(s); logs: ${prefix}0.log ... ${prefix}$((nproc_ - 1)).log" >&2
pids=()
for ((i = 0; i < nproc_; i++)); do
  SSM_COORDINATOR="localhost:${port}" SSM_NUM_PROCESSES="$nproc_" SSM_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${ndev}" \
    "$@" > "${prefix}${i}.log" 2>&1 &
  pids+=($!)
done
# Each process's status; for a failed one, its one-line error, else its last log line.
status=0
for i in "${!pids[@]}"; do
  rc=0
  wait "${pids[$i]}" || rc=$?
  if ((rc)); then
    status=$rc
    log="${prefix}${i}.log"
    line=$(grep -E -m1 "^ssm-jax: error:|Terminating process because" "$log" | cut -c1-400 || true)
    echo "process $i exited with status $rc: ${line:-$(tail -n 1 "$log")}" >&2
  fi
done
exit $status
