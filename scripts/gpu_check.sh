#!/usr/bin/env bash
# One GPU run that measures the Wan2.1-1.3B path (docs/gpu.md): gpu tests, kernel benchmark, runtime
# benchmark with the diffusers no-cache baseline. Writes $OUT/gpu_check.json (and logs under $OUT/parts).
#
#   OUT=out/gpu scripts/gpu_check.sh          # on an H100/H200: under 8 minutes
#   scripts/gpu_check.sh --tiny               # dry run on a CPU at reduced size (FORCEKIT_GPU_CHECK_TINY=1)
#
# PYTHON picks the interpreter (default: python3). Missing Python packages (diffusers, numpy,
# safetensors, tqdm, pytest) are installed from a wheel folder when one is there: FORCEKIT_WHEELS,
# default .whl/gpu (filled by scripts/gpu_wheels.sh; carry it to the GPU machine). Without diffusers
# the Wan VAE and the baseline cannot run: those steps record the import error, the others still run.
set -u
cd "$(dirname "$0")/.."
TINY=${FORCEKIT_GPU_CHECK_TINY:-0}
[ "${1:-}" = "--tiny" ] && TINY=1
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_check}
WHEELS=${FORCEKIT_WHEELS:-.whl/gpu}
PARTS="$OUT/parts"
mkdir -p "$PARTS"
STEPS_FILE="$PARTS/steps.tsv"
: > "$STEPS_FILE"
START=$(date +%s)

missing=$($PY - <<'PY'
import importlib.util
print(" ".join(m for m in ("numpy", "safetensors", "tqdm", "pytest", "diffusers") if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ] && [ -d "$WHEELS" ]; then
  echo "installing from $WHEELS: $missing"
  $PY -m pip install -q --no-index --find-links "$WHEELS" $missing > "$PARTS/pip.log" 2>&1 || echo "pip install failed (see $PARTS/pip.log)"
fi

# step NAME TIMEOUT_S JSON_OUT CMD...: run one step with a time limit; record its status.
step() {
  local name=$1 limit=$2 json=$3; shift 3
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  if [ "$json" = "-" ]; then
    timeout "$limit" "$@" > "$PARTS/$name.log" 2>&1
  else
    timeout "$limit" "$@" > "$PARTS/$name.json" 2> "$PARTS/$name.log"
  fi
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS_FILE"
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s"
}

if [ "$TINY" = "1" ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  DEVICE=cpu; BUNDLE=random-wan1.3b-reduced; FRAMES=9; RT_FLAGS="--dtype bf16"
  TESTS="tests/test_cuda_step.py tests/test_presets.py"
  KFLAGS="--device cpu --heads 2 --head-dim 16 --tokens-per-frame 4 --frames 6 --dtype fp32 --baselines sdpa --warmup 1 --iters 1"
  L_TEST=300; L_KERN=120; L_RT=240
else
  DEVICE=cuda; BUNDLE=random-wan1.3b; FRAMES=30; RT_FLAGS="--dtype bf16 --capture graphs --warmup"
  TESTS="tests/test_cuda_step.py tests/test_cache_equivalence.py tests/test_runtime_api.py tests/test_presets.py"
  KFLAGS="--baselines sdpa,flex,flash --warmup 3 --iters 10"
  L_TEST=110; L_KERN=110; L_RT=95  # caps: 110 + 70 + 110 + 2 x 95 = 480 s at most
fi

step gpu_tests "$L_TEST" - $PY -m pytest -q -m gpu tests/ -p no:cacheprovider
step runtime_tests "$(( L_TEST * 7 / 11 ))" - $PY -m pytest -q $TESTS -p no:cacheprovider
# Wan2.1-1.3B attention: 12 heads x 128, 1560 tokens a latent frame, 21 frames in chunks of 3
step bench_kernels "$L_KERN" json $PY -m forcekit bench kernels --json --extra-head-dims "" $KFLAGS
for s in 2 4; do
  step "bench_runtime_${s}steps" "$L_RT" json $PY -m forcekit bench runtime --bundle "$BUNDLE" --device "$DEVICE" \
    --steps "$s" --frames "$FRAMES" --json --no-uncached --overlap --baseline diffusers $RT_FLAGS
done

$PY scripts/gpu_check_report.py "$OUT" "$TINY" "$(( $(date +%s) - START ))"
