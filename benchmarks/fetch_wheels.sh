#!/usr/bin/env bash
# Downloads the small pure-Python wheels that gpu_check.sh may need on the lent GPU machine
# (it has jax, flax, optax, orbax-checkpoint, tensorboard; no ml_collections, maybe no
# pytest, and no network) into benchmarks/wheels/ (git-ignored; carry it with the run).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$here/wheels"
pip download --no-deps --only-binary=:all: -d "$here/wheels" \
  "ml_collections==1.1.0" "pytest>=8" pluggy iniconfig pygments packaging
du -sh "$here/wheels"
ls -l "$here/wheels"
