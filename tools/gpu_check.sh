#!/usr/bin/env bash
# One prepared check for a lent GPU machine (no network; it has jax, flax, optax,
# orbax-checkpoint, tensorboard, but no tensorflow/tfds/grain/clu/ml_collections).
#
#   1. pytest tests/method/test_{model,scoring,losses,masks}.py
#   2. benchmarks/throughput.py at 128 px, width 64, batch 32 and a larger batch (128),
#      float32 and bfloat16, then a short table (and one RESULT JSON line per run);
#   3. while time is left, compile-ahead on against off: the quickstart's cold
#      `train --evaluate`, alternating (SSM_JAX_COMPILE_AHEAD=1/0);
#   4. while time is left, `ssm-jax benchmark`'s categories as one vmapped group against one
#      after another (the "benchmark block"; BENCH_AB=0 skips it).
#
# Before the device call, on this machine: `bash tools/fetch_wheels.sh` (grain,
# array_record, portpicker, clu, ml_collections for Python 3.12 and this machine's python,
# 8.8 MB, into the git-ignored tools/wheels/). Then run, with
# the device tool:  command "bash tools/gpu_check.sh", carry ["tools/wheels"],
# timeout_s 600 (the script keeps itself under ~9 minutes: every part has its own timeout).
#
# Options: --smoke (tiny sizes, runs on CPU in ~minutes; checks the script itself),
#          BATCHES="32 128" DTYPES="float32 bfloat16" SIZE=128 WIDTH=64 (environment).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1

if [[ $SMOKE == 1 ]]; then
  SIZE=${SIZE:-32}; WIDTH=${WIDTH:-8}; BATCHES=${BATCHES:-"4 8"}; DTYPES=${DTYPES:-"float32 bfloat16"}
  BENCH_ARGS=(--repeats 1 --iters 1 --refine-passes 2 --peak-size 512)
  TEST_TIMEOUT=${TEST_TIMEOUT:-900}; RUN_TIMEOUT=${RUN_TIMEOUT:-400}
  AB_ROUNDS=${AB_ROUNDS:-1}; AB_TIMEOUT=${AB_TIMEOUT:-400}; AB_DEADLINE=${AB_DEADLINE:-100000}
else
  SIZE=${SIZE:-128}; WIDTH=${WIDTH:-64}; BATCHES=${BATCHES:-"32 128"}; DTYPES=${DTYPES:-"float32 bfloat16"}
  BENCH_ARGS=(--repeats 5 --iters 3 --refine-passes 3)
  TEST_TIMEOUT=${TEST_TIMEOUT:-150}; RUN_TIMEOUT=${RUN_TIMEOUT:-95}
fi

# --- wheels the machine lacks (grain, clu, ml_collections, ...), into a private folder ----
. tools/carry_env.sh "${TMPDIR:-/tmp}/ssm_jax_site" || exit 2

echo "== device"
python -c "import jax; print(jax.__version__, jax.devices())" || exit 3
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
  --format=csv,noheader

echo "== tests"
timeout "$TEST_TIMEOUT" python -m pytest tests/method/test_model.py tests/method/test_scoring.py \
  tests/method/test_losses.py tests/method/test_masks.py -q -p no:cacheprovider 2>&1 | tail -15
test_rc=${PIPESTATUS[0]}
echo "tests exit code: $test_rc"

echo "== throughput (size $SIZE, width $WIDTH)"
for b in $BATCHES; do
  for dt in $DTYPES; do
    log="$OUT_DIR/throughput_b${b}_${dt}.log"
    echo "-- batch $b $dt"
    timeout "$RUN_TIMEOUT" python benchmarks/throughput.py --image-size "$SIZE" \
      --width "$WIDTH" --batch "$b" --dtype "$dt" "${BENCH_ARGS[@]}" >"$log" 2>&1
    rc=$?
    grep -v '^RESULT ' "$log" | tail -6
    (( rc )) && echo "   (exit $rc$( ((rc == 124)) && echo ': timed out'))"
  done
done

# Compile-ahead on/off (runtime.compile_ahead: on by default off CPU, unmeasured on a GPU):
# the quickstart's train --evaluate with an empty compilation cache, alternating, while
# time is left (the device call's limit is 600 s).
echo "== compile-ahead A/B (quickstart train --evaluate, empty cache)"
AB_ROUNDS=${AB_ROUNDS:-2}; AB_TIMEOUT=${AB_TIMEOUT:-100}
for r in $(seq "$AB_ROUNDS"); do
  for ahead in 1 0; do
    if (( SECONDS + AB_TIMEOUT > ${AB_DEADLINE:-560} )); then
      echo "-- skipped (round $r, ahead=$ahead): ${SECONDS} s used"; continue
    fi
    wd="$(mktemp -d)"
    t0=$(date +%s.%N)
    SSM_JAX_COMPILE_AHEAD=$ahead SSM_JAX_CACHE_DIR="$wd/cache" timeout "$AB_TIMEOUT" \
      python -m ssm_jax train --config configs/quickstart.py --workdir "$wd/run" --evaluate \
      >"$OUT_DIR/ahead_${ahead}_r$r.log" 2>&1
    rc=$?
    echo "-- round $r ahead=$ahead: $(python -c "import time; print(f'{time.time() - $t0:.1f}')") s (exit $rc)"
    rm -rf "$wd"
  done
done

# ---- benchmark block: begin (ssm-jax benchmark; kept apart from the other parts) ----
# Categories as one vmapped group against one after another (benchmarks/benchmark_groups.py:
# whole `ssm-jax benchmark` commands in fresh processes, compilation cache off), then the
# step alone (benchmarks/multi_model.py). Skipped when the call's time would run out.
# BENCH_AB=0 skips it; BENCH_AB_TIMEOUT (s) bounds each of the two.
BENCH_AB=${BENCH_AB:-1}; BENCH_AB_TIMEOUT=${BENCH_AB_TIMEOUT:-150}
if [[ $SMOKE == 1 ]]; then
  BENCH_AB_ARGS=(--config configs/quickstart.py --categories 2 --steps 4 --rounds 1 --num-train 12
    --set data.image_size=32 model.width=4 train.batch_size=4 "mask.ks=(4,8)" "eval.ks=(8,)")
  MULTI_ARGS=(--config configs/quickstart.py --models 1,2 --steps 2 --set data.image_size=32 model.width=4)
else
  BENCH_AB_ARGS=(--config configs/cpu.py --categories 4 --steps 200 --rounds 1 --num-train 80)
  MULTI_ARGS=(--config configs/cpu.py --models 1,4,8 --steps 20)
fi
if [[ $BENCH_AB == 1 ]]; then
  echo "== benchmark: categories as one vmapped group vs one after another"
  for part in groups multi_model; do
    if (( SECONDS + BENCH_AB_TIMEOUT > ${BENCH_AB_DEADLINE:-580} )); then
      echo "-- $part skipped: ${SECONDS} s used"; continue
    fi
    if [[ $part == groups ]]; then
      timeout "$BENCH_AB_TIMEOUT" python benchmarks/benchmark_groups.py "${BENCH_AB_ARGS[@]}" \
        >"$OUT_DIR/bench_groups.log" 2>&1
    else
      timeout "$BENCH_AB_TIMEOUT" python benchmarks/multi_model.py "${MULTI_ARGS[@]}" \
        >"$OUT_DIR/bench_multi_model.log" 2>&1
    fi
    rc=$?
    tail -6 "$OUT_DIR/bench_$( [[ $part == groups ]] && echo groups || echo multi_model).log"
    (( rc )) && echo "   ($part exit $rc$( ((rc == 124)) && echo ': timed out'))"
  done
fi
# ---- benchmark block: end ----

echo "== table"
python - "$OUT_DIR" <<'EOF'
import glob, json, os, sys

rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "throughput_*.log"))):
    res = None
    with open(path) as f:
        for line in f:
            if line.startswith("RESULT "):
                res = json.loads(line[7:])
    name = os.path.basename(path)[len("throughput_"):-len(".log")]
    if res is None:
        rows.append(f"{name:<18} (no result: see {path})")
        continue
    c, pk = res["config"], res.get("peak", {})
    fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"
    rows.append(
        f"{c['batch']:>5} {c['dtype']:<8} {fmt(res.get('train_img_per_s')):>9} "
        f"{fmt(res.get('eval_img_per_s')):>9} {fmt(res.get('eval_refined_img_per_s')):>9} "
        f"{fmt((res.get('model_flops_per_image') or 0) / 1e9, 2):>9} "
        f"{fmt((pk.get('peak_flops_per_s') or 0) / 1e12):>8} {fmt(res.get('mfu'), 3):>6} "
        f"{fmt(res.get('train_compile_s')):>7}")
    print("RESULT " + json.dumps(res))
print(f"{'batch':>5} {'dtype':<8} {'train/s':>9} {'eval/s':>9} {'evalR/s':>9} "
      f"{'GF/img':>9} {'peakTF':>8} {'MFU':>6} {'cmp_s':>7}")
print("\n".join(rows))
EOF
exit "$test_rc"
