#!/usr/bin/env bash
# One host with several GPUs: a single process drives all local GPUs (the data mesh spans
# them). Usage: launch/multi_gpu.sh --config configs/paper.py --workdir runs/x [--config.K=V]
set -euo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-true}
exec ssm-jax train "$@"
