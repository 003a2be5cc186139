#!/usr/bin/env bash
# The world model's `told` recipe in one GPU run (issue 14, docs/gpu.md "The world recipe on a GPU"): record
# health_gathering on every CPU core, train the told teacher, its dCM and SF-DMD students on the GPU, then
# evaluate the student rows and the teacher on the CPU cores in parallel. $OUT receives the three bundles,
# eval/ and controls/ (one JSON per row each), the teacher's gap JSON and times.txt: a CPU session continues from
# those bundles.
#
#   OUT=out/gpu_recipe scripts/gpu_recipe.sh     # on an H100/H200: about 9 minutes (teacher capped at 240 s)
#   scripts/gpu_recipe.sh --tiny                 # CPU dry run at toy size (3 episodes, a few steps)
#
# PYTHON picks the interpreter. Missing packages (numpy, safetensors, tqdm, vizdoom) install from
# FORCEKIT_WHEELS (default .whl/recipe, filled by `scripts/gpu_wheels.sh recipe`; carry it, about 57 MB).
# Big files (recordings, latents, checkpoints) stay in WORK (default /tmp/forcekit_gpu_recipe), not in $OUT.
# Step counts: TOLD_TEACHER_STEPS (6000), WARP_TEACHER_MAX_SECONDS (240), WARP_DCM_STEPS (300), WARP_DMD_STEPS
# (200); EVAL_SECONDS (150) caps each evaluation. CAMERA_FOV (default "measured": `eval camera` on the held-out
# recordings) turns the told teacher's stacked frame as a pinhole camera turns; CAMERA_FOV=0 keeps the translation. REFINE=1 also trains the frame refiner on the SF-DMD student
# (`train refiner --device cuda`, REFINER_STEPS 1200) and ships it as $OUT/default (not yet timed on a GPU); with
# LONG=1 as well, the default is the SF-DMD student self-forced further on 128-frame rollouts of long key holds
# (the CPU recipe's `long` stage, LONG_STEPS 120), with that refiner.
set -euo pipefail
cd "$(dirname "$0")/.."
TINY=0
[[ ${1:-} == --tiny ]] && TINY=1
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_recipe}
WHEELS=${FORCEKIT_WHEELS:-.whl/recipe}
WORK=${WORK:-/tmp/forcekit_gpu_recipe}
mkdir -p "$OUT" "$WORK/bin"
OUT=$(cd "$OUT" && pwd)
START=$SECONDS

missing=$($PY - <<'PY'
import importlib.util
print(" ".join(m for m in ("numpy", "safetensors", "tqdm", "vizdoom") if importlib.util.find_spec(m) is None))
PY
)
if [[ -n $missing && -d $WHEELS ]]; then
    echo "installing from $WHEELS: $missing"
    $PY -m pip install -q --no-index --no-deps --find-links "$WHEELS" $missing > "$OUT/pip.log" 2>&1
fi

# The recipe calls "$FK" as one word: a wrapper runs this checkout's forcekit with $PY.
printf '#!/usr/bin/env bash\nPYTHONPATH=%q exec %q -m forcekit "$@"\n' "$PWD" "$(command -v "$PY")" > "$WORK/bin/forcekit"
chmod +x "$WORK/bin/forcekit"
export FK=$WORK/bin/forcekit DATA=$WORK/data RUNS=$WORK/runs CODEC=models/health_gathering_guided IDLE_PROB=0.06
export TRAIN=$DATA/hg_train_idle WARP_EVAL=0 RECORD_JOBS=$(nproc) CAMERA_FOV=${CAMERA_FOV:-measured}
EVAL_EPISODES=16 CONTROL_EPISODES=8 STILL=64 TEACHER_EPISODES=4 HORIZON=64 HOLD=8 GAP_CLIPS=256
if [[ $TINY == 1 ]]; then
    export DEVICE=cpu THREADS=1 TRAIN_EPISODES=3 HELDOUT_EPISODES=2 MAX_FRAMES=40 RECORD_JOBS=2
    export TOLD_TEACHER_STEPS=3 WARP_DCM_STEPS=2 WARP_DMD_STEPS=2 WARP_TEACHER_MAX_SECONDS=0
    export REFINER_STEPS=2 STUDENT_CHAINS=4 REST_CHAINS=0 SCENES=2 LONG_STEPS=2 LONG_EPISODES=3 LONG_ROLLOUT=4
    EVAL_EPISODES=1 CONTROL_EPISODES=1 STILL=4 TEACHER_EPISODES=1 HORIZON=8 HOLD=2 GAP_CLIPS=8
else
    export DEVICE=cuda THREADS=4
    export TOLD_TEACHER_STEPS=${TOLD_TEACHER_STEPS:-6000} WARP_TEACHER_MAX_SECONDS=${WARP_TEACHER_MAX_SECONDS:-240}
    export WARP_DCM_STEPS=${WARP_DCM_STEPS:-300} WARP_DMD_STEPS=${WARP_DMD_STEPS:-200}
fi
export EVAL_EPISODES
mkdir -p "$RUNS/eval" "$RUNS/controls"
[[ -e $RUNS/probe ]] || ln -s "$PWD/models/health_gathering_probe" "$RUNS/probe"

# shellcheck source=recipe_health_gathering.sh
source scripts/recipe_health_gathering.sh
log_file=$WORK/recipe.log
set -E   # a failing stage shows the end of its log (here and in $OUT), then the script stops
trap 'tr "\r" "\n" < "$log_file" | tail -n 40 | tee "$OUT/failed_log.txt"' ERR
stage_record > "$log_file" 2>&1
stage_told >> "$log_file" 2>&1
if [[ ${REFINE:-0} == 1 ]]; then
    TOLD_SF=$RUNS/told/dmd/bundle DEFAULT_OUT=$RUNS/default REFINER_THREADS=$THREADS refine_train_ship >> "$log_file" 2>&1
    if [[ ${LONG:-0} == 1 ]]; then
        LONG=$DATA/hg_long TOLD_SF=$RUNS/told/dmd/bundle TOLD_TEACHER=$RUNS/told/teacher/bundle DECODER=$RUNS/refine \
            DEFAULT_OUT=$RUNS/default long_train_ship >> "$log_file" 2>&1
    fi
fi
trap - ERR
echo "trained in $((SECONDS - START)) s"

# The evaluations, each on its own CPU cores, in parallel; each is capped so the bundles always come back.
limit=${EVAL_SECONDS:-150}
S=$RUNS/told
rows=("told_dcm_2 $S/dcm/bundle 2" "told_dmd_1 $S/dmd/bundle 1" "told_dmd_2 $S/dmd/bundle 2")
[[ ${REFINE:-0} == 1 ]] && rows+=("default_1 $RUNS/default 1")
for row in "${rows[@]}"; do
    set -- $row
    timeout "$limit" "$FK" eval world --bundle "$2" --env "$ENV_NAME" --episodes "$EVAL_EPISODES" --horizon "$HORIZON" \
        --context 4 --seed 100000 --probe "$RUNS/probe" --steps "$3" --threads 2 --out "$RUNS/eval/$1.json" \
        > /dev/null 2> "$RUNS/eval/$1.log" &
    timeout "$limit" "$FK" eval controls --bundle "$2" --env "$ENV_NAME" --episodes "$CONTROL_EPISODES" \
        --still "$STILL" --hold "$HOLD" --steps "$3" --threads 2 --json --out "$RUNS/controls/$1.json" \
        > /dev/null 2> "$RUNS/controls/$1.log" &
done
timeout "$limit" "$FK" eval controls --bundle "$S/teacher/bundle" --env "$ENV_NAME" --episodes "$TEACHER_EPISODES" \
    --still 16 --hold "$HOLD" --mode session --steps 8 --guidance 1.0 --threads 2 --json \
    --out "$RUNS/controls/told_teacher_session_8.json" > /dev/null 2> "$RUNS/controls/teacher.log" &
timeout "$limit" "$FK" eval gap --bundle "$S/teacher/bundle" --data "$HELDOUT" --latents-cache "$RUNS/teacher" \
    --clips "$GAP_CLIPS" --threads 2 > "$S/gap_teacher.json" 2> "$S/gap.log" &
wait || true

for stage in teacher dcm dmd; do
    mkdir -p "$OUT/$stage"
    cp "$S/$stage/bundle/"* "$OUT/$stage/"
done
if [[ ${REFINE:-0} == 1 ]]; then
    mkdir -p "$OUT/default"
    cp "$RUNS/default/"* "$OUT/default/"
fi
mkdir -p "$OUT/eval" "$OUT/controls"   # a row's world and control JSONs share its name: one folder each
cp "$RUNS/eval/"*.json "$OUT/eval/" 2>/dev/null || true
cp "$RUNS/controls/"*.json "$OUT/controls/" 2>/dev/null || true
cp "$S/gap_teacher.json" "$RUNS/times.txt" "$OUT/" 2>/dev/null || true
cat "$RUNS/eval/"*.log "$RUNS/controls/"*.log "$S/gap.log" "$log_file" 2>/dev/null | tr '\r' '\n' \
    | grep -v -E '[0-9]+/[0-9]+ \[' > "$OUT/logs.txt" || true   # without the progress bars
echo "total $((SECONDS - START)) s" | tee -a "$OUT/times.txt"
ls "$OUT"
