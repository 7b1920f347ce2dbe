#!/usr/bin/env bash
# The device script for the paper configuration on real data (issue 12): configs/paper.py
# (128 px, width 64, batch 32, bfloat16 and float32) trained with `ssm-jax train` on
# magnetic_tile and kolektor and evaluated with `ssm-jax evaluate`, all inside ~8.5
# minutes (benchmarks/gpu_paper.py shares the budget; see its docstring), then one table.
#
# Before the device call, on this machine (both folders are git-ignored):
#   bash tools/fetch_wheels.sh                 # 8.8 MB: grain, clu, ml_collections, ...
#   python tools/prep_device_data.py           # 14 MiB: the two sets at 128 px
# Then, with the device tool: command "bash benchmarks/gpu_paper.sh",
#   carry ["tools/wheels", "tools/device_data"], timeout_s 600.
# The table is printed at the end; $OUT gets paper_results.json and each run's metrics.
#
#   bash benchmarks/gpu_paper.sh --smoke    # CPU, tiny (32 px copies of 8 images per
#                                           # folder, width 4, 4 steps): checks the script
# Environment: BUDGET_S (default 510), DTYPES (bfloat16,float32), SETS, STEPS (0: 50 epochs).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
SITE="${TMPDIR:-/tmp}/ssm_jax_site"
. tools/carry_env.sh "$SITE" || exit 2

echo "== device"
python -c "import jax; print(jax.__version__, jax.devices())" || exit 3
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

args=(--budget "${BUDGET_S:-510}" --dtypes "${DTYPES:-bfloat16,float32}"
      --sets "${SETS:-magnetic_tile,kolektor}" --steps "${STEPS:-0}")
if [[ $SMOKE == 1 ]]; then
  data="$(mktemp -d "${TMPDIR:-/tmp}/ssm_jax_smoke_data.XXXXXX")"
  trap 'rm -rf "$data" "${work:-}"' EXIT
  work="$(mktemp -d "${TMPDIR:-/tmp}/ssm_jax_smoke_runs.XXXXXX")"
  export JAX_PLATFORMS=cpu
  python tools/prep_device_data.py --size 32 --limit 8 --out "$data" || exit 2
  args=(--smoke --budget "${BUDGET_S:-1800}" --dtypes "${DTYPES:-bfloat16,float32}"
        --sets "${SETS:-magnetic_tile,kolektor}" --steps "${STEPS:-0}" --data "$data"
        --workdir "$work")
fi
python benchmarks/gpu_paper.py "${args[@]}"
