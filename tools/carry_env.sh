# Sourced by the device scripts and tools/jax_only_check.sh (bash):
#   . tools/carry_env.sh SITE_DIR
# Installs, from the carried tools/wheels/ (see fetch_wheels.sh), each package that
# ssm-jax train/evaluate/export need and this python lacks (grain, array_record,
# portpicker, clu, ml_collections, flatbuffers) into SITE_DIR, and puts the repository
# and SITE_DIR on PYTHONPATH (the package is used in place: `python -m ssm_jax ...`).
# Returns 2 with one line if it cannot.
carry_install() {
  local root site need=() m
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  site="$1"
  for m in grain array_record portpicker clu ml_collections flatbuffers; do
    python -c "import $m" 2>/dev/null || need+=("$m")
  done
  if (( ${#need[@]} )); then
    if ! ls "$root"/tools/wheels/*.whl >/dev/null 2>&1; then
      echo "carry_env: missing ${need[*]} and no tools/wheels/: run" \
           "'bash tools/fetch_wheels.sh' first and carry tools/wheels" >&2
      return 2
    fi
    echo "== installing ${need[*]} from tools/wheels into $site"
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --find-links "$root/tools/wheels" --target "$site" "${need[@]}" \
      || { echo "carry_env: pip install of ${need[*]} failed" >&2; return 2; }
  fi
  # Optional: without filelock the compilation cache stays off (ssm_jax.runtime.compile_cache);
  # wheel folders fetched before it was added lack it.
  python -c "import filelock" 2>/dev/null \
    || python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
         --find-links "$root/tools/wheels" --target "$site" filelock >/dev/null 2>&1 \
    || true
  export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
}
carry_install "$1"
