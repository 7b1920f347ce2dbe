#!/usr/bin/env bash
# One prepared check for a lent GPU machine, inside one device call of at most 10 minutes
# (no network; the machine has jax, flax, optax, orbax-checkpoint, tensorboard, but no
# tensorflow/tfds/grain/clu/ml_collections). Every part prints the card it ran on:
#
#   paper  bf16 against f32 at the paper configuration (configs/paper.py, 128 px, width
#          64, batch 32) on real data: benchmarks/gpu_paper.py trains with `ssm-jax train`
#          and evaluates magnetic_tile once per dtype: image and pixel AUROC, AUPRO,
#          train/eval images/s, MFU;
#   step   benchmarks/step_ab.py at the paper configuration, the compiled step alone with
#          batches on the device (the host out of the way), alternating rounds: f32 against
#          bf16 (MFU), BatchNorm synchronised over all devices against per host and per
#          device (model.batchnorm_sync; on one GPU all three are one computation, so that
#          A/B shows only its noise), nearest resizing by repeat against the gather,
#          4 steps per call against one (train.steps_per_call);
#   group  benchmarks/multi_model.py: 4 models (configs/cpu.py sizes) in one program,
#          vmapped against unrolled, each against the 4 run one after another;
#   bench  the benchmark block: `ssm-jax benchmark`'s categories as one vmapped group
#          against one after another (benchmarks/benchmark_groups.py; BENCH_AB=0 skips it);
#   conformal  benchmarks/conformal_cost.py: the per-image (conformal) thresholds' time per
#          image for 50-1000 calibration normals at 128-256 px (eval.threshold_rule);
#   tests  pytest tests/method/test_{model,scoring,losses,masks,conformal}.py with the time left;
#   throughput, ahead (not run unless named in PARTS): benchmarks/throughput.py over
#          BATCHES x DTYPES; compile-ahead on against off (the quickstart's cold
#          `train --evaluate`).
#
# Each part has its own time cap and starts only if it can end before DEADLINE seconds
# (default 560) after the script began; a part that cannot is printed as skipped. Logs and
# RESULT JSON lines go to $OUT (the device tool brings them back); stdout ends with a
# summary.
#
# Before the device call, on this machine (both folders are git-ignored):
#   bash tools/fetch_wheels.sh                          # 8.8 MB: grain, clu, ml_collections
#   python tools/prep_device_data.py --sets magnetic_tile   # the set at 128 px, ~9 MiB
# Then, with the device tool: command "bash tools/gpu_check.sh",
#   carry ["tools/wheels", "tools/device_data"], timeout_s 600.
#
# Options: --smoke (tiny sizes on CPU, a few minutes: checks the script itself).
# Environment: PARTS="paper step group bench conformal tests" DEADLINE=560 PAPER_S=220 STEP_S=140
#   GROUP_S=100 BENCH_AB_TIMEOUT=150 TEST_S=90; for throughput: BATCHES="32 128"
#   DTYPES="float32 bfloat16" SIZE=128 WIDTH=64.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/ssm_jax_gpu_check_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}"
export PYTHONUNBUFFERED=1

PARTS=${PARTS:-"paper step group bench conformal tests"}
[[ "${BENCH_AB:-1}" == 0 ]] && PARTS="${PARTS//bench/}"
if [[ $SMOKE == 1 ]]; then
  export JAX_PLATFORMS=cpu
  # Without XLA's CPU backend optimizations: a third of the compile time, same programs.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
  DEADLINE=${DEADLINE:-3000}
  PAPER_S=${PAPER_S:-900}; STEP_S=${STEP_S:-600}; GROUP_S=${GROUP_S:-400}; TEST_S=${TEST_S:-400}
  BENCH_AB_TIMEOUT=${BENCH_AB_TIMEOUT:-400}
  SIZE=${SIZE:-32}; WIDTH=${WIDTH:-8}; BATCHES=${BATCHES:-"4"}; DTYPES=${DTYPES:-"float32"}
  BENCH_ARGS=(--repeats 1 --iters 1 --refine-passes 2 --peak-size 512)
  TINY=(data.image_size=32 model.width=4 train.batch_size=4 "mask.ks=(4,8)" "eval.ks=(8,)")
  STEP_ARGS=(--set data.grayscale=true "${TINY[@]}" --rounds 2 --iters 2 --steps-per-call 2
             --peak)
  GROUP_ARGS=(--config configs/quickstart.py --models 2 --steps 2 --set "${TINY[@]}")
  BENCH_AB_ARGS=(--config configs/quickstart.py --categories 2 --steps 4 --rounds 1 --num-train 12
    --set data.image_size=32 model.width=4 train.batch_size=4 "mask.ks=(4,8)" "eval.ks=(8,)")
  TESTS=(tests/method/test_masks.py)
  CONFORMAL_ARGS=(--normals 20 --sizes 32 --batch 4)
  CONFORMAL_S=${CONFORMAL_S:-200}
else
  DEADLINE=${DEADLINE:-560}
  PAPER_S=${PAPER_S:-220}; STEP_S=${STEP_S:-140}; GROUP_S=${GROUP_S:-100}; TEST_S=${TEST_S:-90}
  BENCH_AB_TIMEOUT=${BENCH_AB_TIMEOUT:-150}
  SIZE=${SIZE:-128}; WIDTH=${WIDTH:-64}; BATCHES=${BATCHES:-"32 128"}
  DTYPES=${DTYPES:-"float32 bfloat16"}
  BENCH_ARGS=(--repeats 5 --iters 3 --refine-passes 3)
  STEP_ARGS=(--set data.grayscale=true --rounds 5 --iters 8 --steps-per-call 4 --peak)
  GROUP_ARGS=(--config configs/cpu.py --models 4 --steps 20)
  BENCH_AB_ARGS=(--config configs/cpu.py --categories 4 --steps 200 --rounds 1 --num-train 80)
  TESTS=(tests/method/test_model.py tests/method/test_scoring.py tests/method/test_losses.py
         tests/method/test_masks.py tests/method/test_conformal.py)
  CONFORMAL_ARGS=(--normals 50,200,1000 --sizes 128,256 --batch 32)
  CONFORMAL_S=${CONFORMAL_S:-45}
fi

# --- wheels the machine lacks (grain, clu, ml_collections, ...), into a private folder ----
. tools/carry_env.sh "${TMPDIR:-/tmp}/ssm_jax_site" || exit 2

echo "== device"
CARD="$(python -c "import jax; d = jax.devices()[0]; print(f'{d.device_kind} x{jax.device_count()}')")" \
  || exit 3
python -c "import jax; print(jax.__version__, jax.devices())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
  --format=csv,noheader
echo "card: $CARD"

declare -A STATUS
want() { [[ " $PARTS " == *" $1 "* ]]; }
# budget NAME CAP [MIN]: sets CAP to the seconds part NAME may take (its cap, or what is
# left before the deadline); 0, with a "skipped" line, when that is under MIN (30 s).
budget() {
  local left=$(( DEADLINE - SECONDS )) min=${3:-30}
  CAP=$2
  (( left < CAP )) && CAP=$left
  if (( CAP < min )); then
    echo "== $1: skipped (${SECONDS} s used of $DEADLINE)"
    STATUS[$1]="skipped (no time left)"
    CAP=0
  fi
}
run_part() {  # NAME CAP LOG CMD...: runs CMD under `timeout CAP`, output to LOG
  local name=$1 cap=$2 log=$3 rc t0=$SECONDS
  shift 3
  echo "== $name on $CARD (cap ${cap} s)"
  timeout "$cap" "$@" >"$log" 2>&1
  rc=$?
  STATUS[$name]="exit $rc$( ((rc == 124)) && echo ', timed out') in $((SECONDS - t0)) s"
  echo "   ${STATUS[$name]}; log $log"
  return $rc
}

if want paper; then
  budget paper "$PAPER_S" 90
  if (( CAP > 0 )); then
    if [[ $SMOKE == 1 ]]; then
      run_part paper "$CAP" "$OUT_DIR/paper.log" env BUDGET_S=$((CAP - 30)) \
        SETS=magnetic_tile bash benchmarks/gpu_paper.sh --smoke
    elif [[ -d tools/device_data/128/magnetic_tile ]]; then
      run_part paper "$CAP" "$OUT_DIR/paper.log" python benchmarks/gpu_paper.py \
        --sets magnetic_tile --dtypes bfloat16,float32 --budget $((CAP - 25)) \
        --eval-reserve 40 --out "$OUT_DIR/paper"
    else
      echo "== paper: skipped (no tools/device_data/128/magnetic_tile: run" \
           "'python tools/prep_device_data.py --sets magnetic_tile' and carry tools/device_data)"
      STATUS[paper]="skipped (no data)"
    fi
  fi
fi

if want step; then
  budget step "$STEP_S"
  (( CAP > 0 )) && run_part step "$CAP" "$OUT_DIR/step_ab.log" python benchmarks/step_ab.py \
    "${STEP_ARGS[@]}"
fi

if want group; then
  budget group "$GROUP_S"
  (( CAP > 0 )) && run_part group "$CAP" "$OUT_DIR/group.log" python benchmarks/multi_model.py \
    --group-mode vmap,unroll "${GROUP_ARGS[@]}"
fi

# ---- benchmark block: begin (ssm-jax benchmark; kept apart from the other parts) ----
# Categories as one vmapped group against one after another (benchmarks/benchmark_groups.py:
# whole `ssm-jax benchmark` commands in fresh processes, compilation cache off); the step
# alone is the group part above (benchmarks/multi_model.py). Skipped when the call's time
# would run out. BENCH_AB=0 skips it; BENCH_AB_TIMEOUT (s) bounds it.
if want bench; then
  budget bench "$BENCH_AB_TIMEOUT"
  (( CAP > 0 )) && run_part bench "$CAP" "$OUT_DIR/bench_groups.log" \
    python benchmarks/benchmark_groups.py "${BENCH_AB_ARGS[@]}"
fi
# ---- benchmark block: end ----

if want throughput; then
  for b in $BATCHES; do
    for dt in $DTYPES; do
      budget "throughput_b${b}_${dt}" 95
      (( CAP > 0 )) && run_part "throughput_b${b}_${dt}" "$CAP" \
        "$OUT_DIR/throughput_b${b}_${dt}.log" python benchmarks/throughput.py \
        --image-size "$SIZE" --width "$WIDTH" --batch "$b" --dtype "$dt" \
        --input-dtype uint8 "${BENCH_ARGS[@]}"
    done
  done
fi

if want ahead; then
  # Compile-ahead on/off (runtime.compile_ahead): the quickstart's train --evaluate with an
  # empty compilation cache, alternating.
  for r in 1 2; do
    for ahead in 1 0; do
      budget "ahead_${ahead}_r$r" 100
      (( CAP > 0 )) || continue
      wd="$(mktemp -d)"
      SSM_JAX_COMPILE_AHEAD=$ahead SSM_JAX_CACHE_DIR="$wd/cache" \
        JAX_COMPILATION_CACHE_DIR="$wd/xla" run_part "ahead_${ahead}_r$r" "$CAP" \
        "$OUT_DIR/ahead_${ahead}_r$r.log" python -m ssm_jax train \
        --config configs/quickstart.py --workdir "$wd/run" --evaluate
      rm -rf "$wd"
    done
  done
fi

if want conformal; then
  budget conformal "$CONFORMAL_S" 20
  (( CAP > 0 )) && run_part conformal "$CAP" "$OUT_DIR/conformal.log" \
    python benchmarks/conformal_cost.py "${CONFORMAL_ARGS[@]}"
fi

test_rc=0
if want tests; then
  budget tests "$TEST_S"
  if (( CAP > 0 )); then
    run_part tests "$CAP" "$OUT_DIR/tests.log" python -m pytest "${TESTS[@]}" -q \
      -p no:cacheprovider
    test_rc=$?
    tail -3 "$OUT_DIR/tests.log"
  fi
fi

echo
echo "== summary on $CARD (${SECONDS} s of $DEADLINE)"
for p in paper step group bench conformal tests; do
  want "$p" && echo "$p: ${STATUS[$p]:-not run}"
done
if [[ -f "$OUT_DIR/paper.log" ]]; then
  echo "-- paper (bf16 vs f32, magnetic_tile; MFU from the loop's steps/s)"
  sed -n '/^== paper config/,$p' "$OUT_DIR/paper.log"
fi
if [[ -f "$OUT_DIR/step_ab.log" ]]; then
  echo "-- step A/Bs (compiled step alone, batches on the device)"
  grep -E '^(step_ab on|== |   )' "$OUT_DIR/step_ab.log" | grep -v 'compiled in'
fi
if [[ -f "$OUT_DIR/group.log" ]]; then
  echo "-- group (vmapped vs unrolled vs one after another)"
  grep -vE '^(WARNING|I[0-9]|W[0-9])' "$OUT_DIR/group.log" | tail -6
fi
if [[ -f "$OUT_DIR/bench_groups.log" ]]; then
  echo "-- bench (ssm-jax benchmark: categories as one group vs one after another)"
  tail -6 "$OUT_DIR/bench_groups.log"
fi
if [[ -f "$OUT_DIR/conformal.log" ]]; then
  echo "-- conformal (per-image thresholds, ms per image)"
  grep '^{"normals"' "$OUT_DIR/conformal.log"
fi
for f in "$OUT_DIR"/throughput_*.log; do
  [[ -f $f ]] && { echo "-- $(basename "$f" .log)"; grep -v '^RESULT ' "$f" | tail -4; }
done
exit "$test_rc"
