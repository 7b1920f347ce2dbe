#!/usr/bin/env bash
# Proves that `ssm-jax train` and `ssm-jax evaluate` run on a JAX-only machine like the lent
# GPU machines: a fresh virtual environment (no --system-site-packages) with only jax,
# flax, optax, orbax-checkpoint, tensorboard and what the GPU image also holds that ssm_jax
# uses (matplotlib, tqdm, wrapt, cloudpickle; pillow, scipy, pyyaml, etils come with the
# first five), no tensorflow, tfds, grain, clu or ml_collections, and ssm_jax not
# installed. The carried wheels (tools/fetch_wheels.sh) are installed into a private
# folder exactly as the device scripts do (tools/carry_env.sh), then train + evaluate
# run on the embedded synthetic data at the test suite's tiny size (tests/cli_runs.py: 32 px,
# width 4, 8 steps), so that with the suite's compilation cache and XLA flags (.ci/run
# exports both) its programs are read back, not compiled again.
#
# CI builds the venv (--prepare: it needs pip's registry, about a minute) in the background
# while the tests run, and runs the check after them. Package versions are the ones of the
# calling python (CI's venv) where it has them, so both agree.
#
#   bash tools/jax_only_check.sh [--prepare]   # JAX_ONLY_VENV=DIR to build the venv elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${JAX_ONLY_VENV:-$ROOT/.venv-jaxonly}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ssm_jax_only.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS

pin() {  # NAME -> NAME==VERSION of the calling python, or NAME
  python3 -c "import importlib.metadata as m; print('$1==' + m.version('$1'))" 2>/dev/null \
    || echo "$1"
}
BASE=(jax jaxlib ml_dtypes flax optax orbax-checkpoint tensorboard)  # ml_dtypes: pyproject.toml pins it
IMAGE=(matplotlib tqdm wrapt cloudpickle)  # on the GPU image too (KINDS.md)
specs=()
for p in "${BASE[@]}" "${IMAGE[@]}"; do specs+=("$(pin "$p")"); done
quiet() {  # runs pip quietly, without this machine's find-links warnings
  local out rc=0
  out="$("$@" 2>&1)" || rc=$?
  grep -v '^WARNING: Location' <<<"$out" || true
  return $rc
}

[[ -d "$ROOT/tools/wheels" ]] || bash tools/fetch_wheels.sh >/dev/null
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "== building $VENV: ${specs[*]}"
  python3 -m venv "$VENV"
  quiet "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
# --no-compile: CI builds this beside the tests; modules are byte-compiled when imported
quiet "$VENV/bin/python" -m pip install --quiet --no-compile "${specs[@]}"
echo "== venv ready ($((SECONDS - t0)) s)"
[[ "${1:-}" == "--prepare" ]] && exit 0

# From here on the JAX-only python, outside the repository's own venvs.
export PATH="$VENV/bin:$PATH"
unset PYTHONPATH VIRTUAL_ENV
export JAX_PLATFORMS=cpu
for m in tensorflow tensorflow_datasets grain clu ml_collections ssm_jax; do
  if (cd / && python -c "import $m" 2>/dev/null); then
    echo "jax_only_check: $m is importable in $VENV: not a JAX-only environment" >&2
    exit 1
  fi
done

. tools/carry_env.sh "$WORK/site"

# tests/cli_runs.py's TINY + STEPS (the same programs as the suite's shared run).
TINY=(--config.data.image_size=32 --config.model.width=4 --config.train.batch_size=4
      --config.data.synthetic_num_train=24 "--config.mask.ks=(4,8)" "--config.eval.ks=(8,)"
      --config.eval.batch_size=8 --config.train.log_every=2 --config.eval.num_overlays=2
      --config.train.steps=8 --config.train.checkpoint_every=4 --config.train.eval_every=4)
t1=$SECONDS
echo "== ssm-jax train"
python -m ssm_jax train --config configs/quickstart.py --workdir "$WORK/wd" "${TINY[@]}"
echo "== ssm-jax evaluate"
python -m ssm_jax evaluate --workdir "$WORK/wd" >"$WORK/eval.json"
python - "$WORK" <<'EOF'
import glob, json, os, sys

work = sys.argv[1]
res = json.load(open(os.path.join(work, "wd", "eval", "metrics.json")))
assert res["num_images"] > 0 and 0.0 <= res["image_auroc"] <= 1.0, res
events = glob.glob(os.path.join(work, "wd", "events.out.tfevents.*"))
assert events, "no TensorBoard event file"
from ssm_jax.training import tb_writer
scalars = tb_writer.read_scalars(os.path.join(work, "wd"))
assert "loss" in scalars and "val_loss" in scalars, sorted(scalars)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
assert not bad, bad
print(f"jax_only_check: ok (image AUROC {res['image_auroc']:.3f} on {res['num_images']} "
      f"images; TensorBoard scalars {sorted(scalars)})")
EOF
echo "== train + evaluate $((SECONDS - t1)) s, total $((SECONDS - t0)) s"
