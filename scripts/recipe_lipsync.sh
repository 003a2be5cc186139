#!/usr/bin/env bash
# The lip-sync recipe (issue 15): record synthetic speaking faces -> codec -> the ear (audio -> mouth net) ->
# bidirectional lip-sync teacher told the mouth -> causal teacher -> dCM -> SF-DMD -> re-sync the held-out clips
# (own audio and the A/B case; the ear reads the mouth from the audio) -> eval lipsync -> ship models/lipsync
# with a card written from the measured results (bench lipsync and the stream measured in headless Chromium
# first). CONDITION=audio trains the older teacher that
# hears the audio itself (docs/lipsync.md: its mouths follow the audio at a correlation of about 0.2).
#
# Every stage is resumable: each command continues from its run dir's checkpoint, and a stage whose bundle (or
# result file) exists is skipped. Rerun the script after an interruption.
#
#   DATA=/work/data RUNS=/work/runs/lipsync scripts/recipe_lipsync.sh [stage ...]
#
# Stages: record probes codec ear teacher causal dcm dmd generate eval ship bench browser (default: all, in order).
# Sizes come from the variables below (THREADS, *_STEPS, TRAIN_CLIPS, SIZE, MODEL, ...); TINY=1 shrinks all of
# them to a dry run of a minute or two (docs/lipsync.md).
set -euo pipefail
cd "$(dirname "$0")/.."

FK=${FK:-.venv/bin/forcekit}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data}
RUNS=${RUNS:-runs/lipsync}
SHIP=${SHIP:-models/lipsync}
THREADS=${THREADS:-2}
TRAIN=${TRAIN:-$DATA/lipsync_train}
HELDOUT=${HELDOUT:-$DATA/lipsync_heldout}
PROBES=${PROBES:-$RUNS/probes}
CODEC=${CODEC:-$RUNS/codec}
if [[ ${TINY:-0} == 1 ]]; then
    : "${SIZE:=32}" "${TRAIN_CLIPS:=3}" "${HELDOUT_CLIPS:=2}" "${EVAL_CLIPS:=2}" "${PROBE_STEPS:=3}" "${CODEC_STEPS:=4}"
    : "${TEACHER_STEPS:=3}" "${EAR_STEPS:=5}" "${CAUSAL_STEPS:=2}" "${DCM_STEPS:=2}" "${DMD_STEPS:=2}" "${BATCH:=2}" "${CLIP:=4}"
    : "${BENCH_SECONDS:=1}"
    MODEL=${MODEL:-"--layers 1 --heads 2 --head-dim 16 --ffn 32 --freq-dim 32 --patch 2"}
fi
SIZE=${SIZE:-96}
TRAIN_CLIPS=${TRAIN_CLIPS:-300}
HELDOUT_CLIPS=${HELDOUT_CLIPS:-48}
EVAL_CLIPS=${EVAL_CLIPS:-48}
PROBE_STEPS=${PROBE_STEPS:-3000}
EAR_STEPS=${EAR_STEPS:-2000}
CONDITION=${CONDITION:-mouth}
TEACHER_LR=${TEACHER_LR:-1e-3}
GUIDANCE=${GUIDANCE:-4.0}             # CFG on the mouth (audio) condition: the teacher's, distilled into the students
CODEC_STEPS=${CODEC_STEPS:-4000}
TEACHER_STEPS=${TEACHER_STEPS:-9000}
CAUSAL_STEPS=${CAUSAL_STEPS:-200}
DCM_STEPS=${DCM_STEPS:-150}
DMD_STEPS=${DMD_STEPS:-80}
BATCH=${BATCH:-32}
CLIP=${CLIP:-4}                       # frames per clip: sink 1 + window 2 + the frame being made
BENCH_SECONDS=${BENCH_SECONDS:-10}
MODEL=${MODEL:-"--layers 6 --heads 4 --head-dim 32 --ffn 512 --freq-dim 64 --patch 2 --crop-margin 6 --audio-tokens --outside-weight 0.1"}
STUDENT=(--heldout "$HELDOUT" --heldout-episodes 8 --latents-cache "$RUNS/teacher" --threads "$THREADS"
         --ckpt-every-s 120 --batch "$BATCH" --clip-frames "$CLIP" --eval-every 50)

log() { echo "== $(date -u +%H:%M:%S) $*" >&2; }
timed() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "$name $((SECONDS - t0))" >> "$RUNS/times.txt"; }

stage_record() {
    timed record_train $FK record --env lipsync:train --episodes "$TRAIN_CLIPS" --size "$SIZE" --out "$TRAIN" \
        --episodes-per-shard 25 > /dev/null
    timed record_heldout $FK record --env lipsync:heldout --episodes "$HELDOUT_CLIPS" --size "$SIZE" --out "$HELDOUT" \
        --episodes-per-shard 24 > /dev/null
    $FK data check "$TRAIN" > "$RUNS/data_check_train.json"
    $FK data check "$HELDOUT" > "$RUNS/data_check_heldout.json"
}
stage_probes() {   # the measuring sticks (docs/lipsync.md): skipped when PROBES points at trained ones
    [[ -f $PROBES/mouth_probe/probe.json ]] || timed mouth_probe $FK train mouth-probe --data "$TRAIN" \
        --heldout "$HELDOUT" --out "$PROBES/mouth_probe" --steps "$PROBE_STEPS" --threads "$THREADS" > /dev/null
    [[ -f $PROBES/syncnet/syncnet.json ]] || timed syncnet $FK train syncnet --data "$TRAIN" --heldout "$HELDOUT" \
        --out "$PROBES/syncnet" --steps "$PROBE_STEPS" --threads "$THREADS" > /dev/null
}
stage_codec() {   # skipped when CODEC names another codec (e.g. models/lipsync_teacher's)
    [[ -f $RUNS/codec/eval.json || $CODEC != "$RUNS/codec" ]] && return
    timed codec $FK train codec --data "$TRAIN" --out "$RUNS/codec" --steps "$CODEC_STEPS" --batch 16 --crop 32 \
        --threads "$THREADS" > /dev/null
    $FK eval codec --codec "$RUNS/codec" --data "$HELDOUT" --json --threads 1 > "$RUNS/codec/eval.json"
}
stage_ear() {   # the audio -> mouth net a teacher told the mouth carries (docs/lipsync.md, sixth sitting)
    [[ -f $RUNS/audio_mouth/audio_mouth.json ]] || timed ear $FK train audio-mouth --data "$TRAIN" \
        --heldout "$HELDOUT" --out "$RUNS/audio_mouth" --steps "$EAR_STEPS" --threads "$THREADS" > /dev/null
}
stage_teacher() {
    [[ -f $RUNS/teacher/bundle/config.json ]] && return
    local told=()
    [[ $CONDITION == mouth ]] && told=(--mouth-condition --audio-mouth "$RUNS/audio_mouth")
    timed teacher $FK train lipsync-teacher --data "$TRAIN" --codec "$CODEC" --out "$RUNS/teacher" \
        --steps "$TEACHER_STEPS" --batch "$BATCH" --clip-frames "$CLIP" --sink-frames 1 $MODEL --lr "$TEACHER_LR" \
        --guidance "$GUIDANCE" --threads "$THREADS" "${told[@]}" > /dev/null
}
stage_causal() {
    [[ -f $RUNS/causal/bundle/config.json ]] && return
    timed causal $FK train causal --bundle "$RUNS/teacher/bundle" --out "$RUNS/causal" --steps "$CAUSAL_STEPS" \
        --lr 2e-4 "${STUDENT[@]}" > /dev/null
}
stage_dcm() {
    [[ -f $RUNS/dcm/bundle/config.json ]] && return
    timed dcm $FK train dcm --bundle "$RUNS/causal/bundle" --out "$RUNS/dcm" --steps "$DCM_STEPS" --lr 1e-4 \
        --sample-steps 1 --guidance "$GUIDANCE" "${STUDENT[@]}" > /dev/null
}
stage_dmd() {
    [[ -f $RUNS/dmd/bundle/config.json ]] && return
    timed dmd $FK train dmd --bundle "$RUNS/dcm/bundle" --teacher "$RUNS/teacher/bundle" --out "$RUNS/dmd" \
        --steps "$DMD_STEPS" --lr 1e-5 --critic-lr 2e-4 --critic-steps 5 --sample-steps 1 --guidance "$GUIDANCE" "${STUDENT[@]}" > /dev/null
}
stage_generate() {
    [[ -f $RUNS/gen/done.json ]] && return
    timed generate $FK eval lipsync-generate --bundle "$RUNS/dmd/bundle" --clips "$HELDOUT" --out "$RUNS/gen" \
        --max-clips "$EVAL_CLIPS" --threads 1 > "$RUNS/gen.json"
    mv "$RUNS/gen.json" "$RUNS/gen/done.json"
}
eval_row() {
    local name=$1; shift
    [[ -f $RUNS/eval/$name.json ]] || $FK eval lipsync --mouth-probe "$PROBES/mouth_probe" --threads 1 --json \
        --max-clips "$EVAL_CLIPS" --out "$RUNS/eval/$name.json" "$@" > /dev/null
}
stage_eval() {
    mkdir -p "$RUNS/eval"
    eval_row real --clips "$HELDOUT" --syncnet "$PROBES/syncnet"
    eval_row own --clips "$RUNS/gen/own" --syncnet "$PROBES/syncnet" --reference "$HELDOUT"
    eval_row ab --clips "$RUNS/gen/ab" --syncnet "$PROBES/syncnet" --reference "$RUNS/gen/ab_input"
    eval_row ab_truth_a --clips "$RUNS/gen/ab_truth_a"
}
stage_bench() {   # the student the ship stage ships (not an older bundle already at $SHIP)
    mkdir -p "$RUNS/bench"
    local bundle=$RUNS/dmd/bundle
    [[ -f $RUNS/bench/lipsync_t2.json ]] || OMP_NUM_THREADS=2 $FK bench lipsync --bundle "$bundle" --threads 2 \
        --seconds "$BENCH_SECONDS" --json > "$RUNS/bench/lipsync_t2.json"
    [[ -f $RUNS/bench/lipsync_t1.json ]] || OMP_NUM_THREADS=1 $FK bench lipsync --bundle "$bundle" --threads 1 \
        --seconds "$BENCH_SECONDS" --json > "$RUNS/bench/lipsync_t1.json"
}
stage_browser() {   # the served stream measured in headless Chromium (apps/lipsync_browser.py), then eval lipsync
    local bundle=$RUNS/dmd/bundle
    [[ -f $RUNS/browser/browser.json ]] || OMP_NUM_THREADS=$THREADS $FK eval lipsync-browser --bundle "$bundle" \
        --clips "$HELDOUT" --out "$RUNS/browser" --voices "${BROWSER_VOICES:-4}" --threads "$THREADS" > /dev/null
    mkdir -p "$RUNS/eval"
    eval_row browser --clips "$RUNS/browser/browser" --syncnet "$PROBES/syncnet"
}
stage_ship() {
    stage_bench     # the card quotes the speed and the browser's figures: measure them on the student first
    stage_browser
    $PY scripts/lipsync_card.py "$RUNS" "$RUNS/card.md"
    $FK ship --bundle "$RUNS/dmd/bundle" --out "$SHIP" --card "$RUNS/card.md" --name lipsync --steps 1 > /dev/null
}

mkdir -p "$RUNS"
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(record probes codec ear teacher causal dcm dmd generate eval ship bench browser)
for s in "${stages[@]}"; do
    log "stage $s"
    "stage_$s"
done
log done
