#!/usr/bin/env bash
# Downloads the wheels that `ssm-jax train` / `evaluate` need on a JAX-only machine into
# tools/wheels/ (git-ignored; carry it with the device run). The lent GPU machines
# (Python 3.12) have jax, flax, optax, orbax-checkpoint, tensorboard and, from their image,
# matplotlib, pillow, scipy, tqdm, wrapt, cloudpickle, pyyaml, etils, pytest; they lack
#   grain (+ array_record, portpicker), clu, ml_collections, flatbuffers and filelock (the
#   compilation cache: ssm_jax.runtime.compile_cache).
# grain and array_record are compiled: one wheel per Python version (PY_VERSIONS, default
# the device's 3.12 and this machine's python3, which tools/jax_only_check.sh uses).
# About 4.5 MB per Python version; clu, ml_collections and portpicker are pure Python.
#
#   bash tools/fetch_wheels.sh            # then: du -sh tools/wheels
#   PY_VERSIONS="3.12" bash tools/fetch_wheels.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/wheels"
mkdir -p "$dest"
local_py="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
PY_VERSIONS="${PY_VERSIONS:-3.12 $local_py}"
# Versions pinned to pyproject.toml's ranges (the ones CI installs).
WHEELS=(grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 clu==0.0.12 ml_collections==1.1.0
        flatbuffers==25.12.19 filelock==4.3.1)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for v in $(tr ' ' '\n' <<<"$PY_VERSIONS" | sort -u); do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$v" \
    --implementation cp "${platforms[@]}" -d "$dest" "${WHEELS[@]}" 2>&1 \
    | grep -v "^WARNING: Location" || true
  for w in grain array_record; do
    ls "$dest"/${w}-*-cp${v/./}-*.whl >/dev/null 2>&1 \
      || { echo "fetch_wheels: no $w wheel for Python $v" >&2; exit 1; }
  done
done
du -sh "$dest"
ls -l "$dest"
