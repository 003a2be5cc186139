#!/usr/bin/env bash
# The whole recipe for the shipped default world model (ViZDoom health_gathering, 64x64):
# record -> codec -> bidirectional teacher -> probe -> causal teacher -> dCM -> SF-DMD -> guidance distillation ->
# evaluation against the engine and of the controls -> ship (the previous default, models/health_gathering_guided)
# -> refine (the told SF-DMD student with a frame refiner) -> long (that student self-forced further on 128-frame
# rollouts of long key holds, with the same refiner: models/default) -> speed and long-play checks.
#
# Every stage is resumable: each command continues from its run dir's checkpoint, and a stage
# whose bundle (or result file) exists is skipped. Rerun the script after an interruption.
#
#   DATA=/work/data RUNS=/work/runs scripts/recipe_health_gathering.sh [stage ...]
#
# Stages: record codec teacher probe causal dcm dmd guidance eval controls ship refine long bench longplay (default: all,
# in order);
# ablations (the other SF-DMD variants of docs/students.md), stack (frame stacking), still (the still prior) and
# walk (the keys' running average and the flow of walking), rest (walk with unbiased stack noise) and told (rest,
# the model told the stack noise level), sharp (told, self-forced on long rollouts, with an adversarially
# fine-tuned decoder) and gate (told, with the rest gate; all seven docs/world_controls.md) run only when named.
# THREADS (default 2) is the torch thread count of the training stages, DEVICE (default cpu) where they train
# (cuda on a GPU: scripts/gpu_recipe.sh), RECORD_JOBS (default 1) the engine processes recording; TEACHER_STEPS etc.
# (WARP_CAUSAL_STEPS: a causal stage before dCM in the still and walk recipes, default 0: none)
# override the step counts below.
set -euo pipefail
cd "$(dirname "$0")/.."

FK=${FK:-.venv/bin/forcekit}
DATA=${DATA:-data}
RUNS=${RUNS:-runs}
THREADS=${THREADS:-2}
DEVICE=${DEVICE:-cpu}
RECORD_JOBS=${RECORD_JOBS:-1}
ENV_NAME=doom:health_gathering
CODEC=${CODEC:-$RUNS/codec}   # or a bundle dir, whose codec is used (e.g. models/default)
TRAIN=${TRAIN:-$DATA/hg_train}
HELDOUT=$DATA/hg_heldout
CODEC_STEPS=${CODEC_STEPS:-5000}
TEACHER_STEPS=${TEACHER_STEPS:-6000}
PROBE_STEPS=${PROBE_STEPS:-2000}
CAUSAL_STEPS=${CAUSAL_STEPS:-300}
DCM_STEPS=${DCM_STEPS:-200}
DMD_STEPS=${DMD_STEPS:-150}
EVAL_EPISODES=${EVAL_EPISODES:-16}   # held-out episodes per quality row (the bidirectional teacher's takes ~80 min at 16)
STUDENT=(--heldout "$HELDOUT" --latents-cache "$RUNS/teacher" --threads "$THREADS" --device "$DEVICE" --ckpt-every-s 120
         --batch 8 --clip-frames 6 --eval-every 50)

log() { echo "== $(date -u +%H:%M:%S) $*" >&2; }
timed() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "$name $((SECONDS - t0)) s" >> "$RUNS/times.txt"; }

stage_record() {
    # IDLE_PROB > 0: idle stretches in the policy, so the data holds a world at rest (docs/world_controls.md)
    timed record_train "$FK" record --env $ENV_NAME --episodes "${TRAIN_EPISODES:-240}" --seed 0 --out "$TRAIN" \
        --idle-prob "${IDLE_PROB:-0}" --max-frames "${MAX_FRAMES:-1000}" --jobs "$RECORD_JOBS"
    timed record_heldout "$FK" record --env $ENV_NAME --episodes "${HELDOUT_EPISODES:-24}" --seed 100000 \
        --out "$HELDOUT" --max-frames "${MAX_FRAMES:-1000}" --jobs "$RECORD_JOBS"
    "$FK" data check "$TRAIN" > "$RUNS/data_check.txt"
}
stage_codec() {
    [[ -f $RUNS/codec/eval.json ]] && return
    timed codec "$FK" train codec --data "$TRAIN" --out "$RUNS/codec" --steps "$CODEC_STEPS" --batch 16 --crop 32 \
        --threads "$THREADS"
    "$FK" eval codec --codec "$RUNS/codec" --data "$HELDOUT" --json --threads 1 > "$RUNS/codec/eval.json"
}
stage_teacher() {
    [[ -f $RUNS/teacher/bundle/config.json ]] && return
    timed teacher "$FK" train teacher --data "$TRAIN" --codec "$CODEC" --out "$RUNS/teacher" \
        --steps "$TEACHER_STEPS" --batch 8 --clip-frames 6 --layers 6 --heads 4 --head-dim 32 --ffn 512 --patch 2 \
        --guidance 1.5 --threads "$THREADS" --device "$DEVICE"
}
stage_probe() {
    [[ -f $RUNS/probe/probe.json ]] && return
    timed probe "$FK" train probe --data "$TRAIN" --heldout "$HELDOUT" --out "$RUNS/probe" --steps "$PROBE_STEPS" \
        --threads "$THREADS"
}
stage_causal() {
    [[ -f $RUNS/causal/bundle/config.json ]] && return
    timed causal "$FK" train causal --bundle "$RUNS/teacher/bundle" --out "$RUNS/causal" --steps "$CAUSAL_STEPS" \
        --lr 2e-4 "${STUDENT[@]}"
}
stage_dcm() {
    [[ -f $RUNS/dcm/bundle/config.json ]] && return
    timed dcm "$FK" train dcm --bundle "$RUNS/causal/bundle" --out "$RUNS/dcm" --steps "$DCM_STEPS" --lr 1e-4 \
        "${STUDENT[@]}"
}
# SF-DMD from the dCM student: NAME [extra flags] -> $RUNS/NAME (later flags override the defaults).
dmd_run() {
    local name=$1; shift
    [[ -f $RUNS/$name/bundle/config.json ]] && return
    timed "$name" "$FK" train dmd --bundle "$RUNS/dcm/bundle" --teacher "$RUNS/teacher/bundle" --out "$RUNS/$name" \
        --steps "$DMD_STEPS" --lr 1e-5 --critic-lr 2e-4 --critic-steps 5 "${STUDENT[@]}" "$@"
}
stage_dmd() { dmd_run dmd; }
# One row of the quality table: eval world on EVAL_EPISODES held-out episodes (seeds 100000+).
eval_row() {
    local name=$1 bundle=$2 steps=$3; shift 3
    [[ -f $RUNS/eval/$name.json ]] && return
    "$FK" eval world --bundle "$bundle" --env $ENV_NAME --episodes "$EVAL_EPISODES" --horizon 64 --context 4 \
        --seed 100000 --probe "$RUNS/probe" --steps "$steps" --threads 1 \
        --out "$RUNS/eval/$name.json" --plot "$RUNS/eval/$name.png" "$@" > /dev/null
}
# One row of the controls table: eval controls on 8 held-out starts, NAME BUNDLE STEPS [extra flags].
controls_row() {
    local name=$1 bundle=$2 steps=$3; shift 3
    [[ -f $RUNS/controls/$name.json ]] || "$FK" eval controls --bundle "$bundle" --env $ENV_NAME --episodes 8 \
        --steps "$steps" --threads 1 --json --out "$RUNS/controls/$name.json" "$@" > /dev/null
}
stage_eval() {
    mkdir -p "$RUNS/eval"
    eval_row copy "$RUNS/teacher/bundle" 1 --mode copy
    eval_row teacher_50 "$RUNS/teacher/bundle" 50 --mode bidirectional
    eval_row causal_50 "$RUNS/causal/bundle" 50
    for s in 1 2 4; do
        eval_row dcm_$s "$RUNS/dcm/bundle" $s
        eval_row dmd_$s "$RUNS/dmd/bundle" $s
    done
    eval_row dmd_2_g2.5 "$RUNS/dmd/bundle" 2 --guidance 2.5
    eval_row dcm_2_g2.5 "$RUNS/dcm/bundle" 2 --guidance 2.5
    for s in 1 2 4; do eval_row guidance_$s "$RUNS/guidance/bundle" $s; done
}
# What else was tried (docs/students.md): the real score without CFG, with CFG 3, a causal real score,
# and guidance distillation for 2 steps.
stage_ablations() {
    dmd_run dmd_g1 --guidance 1.0
    dmd_run dmd_cfg3 --guidance 3.0
    dmd_run dmd_causal --real-score causal --teacher "$RUNS/causal/bundle"
    for v in dmd_g1 dmd_cfg3 dmd_causal; do
        for s in 1 2; do eval_row "${v}_$s" "$RUNS/$v/bundle" $s; done
    done
    # Guidance distillation for the 2-step schedule at CFG 2.5 (the runtime-CFG row that meets the issue's goals).
    [[ -f $RUNS/guidance2/bundle/config.json ]] || timed guidance2 "$FK" train guidance --bundle "$RUNS/dmd/bundle" \
        --out "$RUNS/guidance2" --sample-steps 2 --guidance 2.5 --steps 300 --lr 5e-5 "${STUDENT[@]}"
    for s in 1 2; do eval_row guidance2_$s "$RUNS/guidance2/bundle" $s; done
}
# Frame stacking (docs/world_controls.md): a teacher that sees the previous frame on the channel axis, with noise
# on it and levels shifted toward noise, and its students. Not the shipped default: its students do not yet keep
# the teacher's controls. The committed teacher (models/health_gathering_teacher_stack) is used when present.
stage_stack() {
    local S=$RUNS/stack T=models/health_gathering_teacher_stack
    if [[ ! -f $T/config.json ]]; then
        T=$S/teacher/bundle
        [[ -f $T/config.json ]] || timed stack_teacher "$FK" train teacher --data "$TRAIN" --codec "$CODEC" \
            --out "$S/teacher" --steps "${STACK_TEACHER_STEPS:-2500}" --batch 8 --clip-frames 6 --layers 6 --heads 4 \
            --head-dim 32 --ffn 512 --patch 2 --guidance 1.5 --threads "$THREADS" --stack-frames 1 --stack-noise 0.3 \
            --timestep-shift 3
    fi
    [[ -f $S/causal/bundle/config.json ]] || timed stack_causal "$FK" train causal --bundle "$T" --out "$S/causal" \
        --steps "$CAUSAL_STEPS" --lr 2e-4 --stack-noise 0.3 "${STUDENT[@]}"
    [[ -f $S/dcm/bundle/config.json ]] || timed stack_dcm "$FK" train dcm --bundle "$S/causal/bundle" --out "$S/dcm" \
        --steps "$DCM_STEPS" --lr 1e-4 "${STUDENT[@]}"
    [[ -f $S/dmd/bundle/config.json ]] || timed stack_dmd "$FK" train dmd --bundle "$S/dcm/bundle" --teacher "$T" \
        --out "$S/dmd" --steps "$DMD_STEPS" --lr 1e-5 --critic-lr 2e-4 --critic-steps 5 "${STUDENT[@]}"
    "$FK" eval gap --bundle "$T" --data "$HELDOUT" --latents-cache "$RUNS/teacher" > "$S/gap_teacher.json"
    mkdir -p "$RUNS/eval" "$RUNS/controls"
    for row in "stack_dcm_2 $S/dcm/bundle 2" "stack_dmd_1 $S/dmd/bundle 1" "stack_dmd_2 $S/dmd/bundle 2"; do
        set -- $row
        eval_row "$1" "$2" "$3"
        controls_row "$1" "$2" "$3"
    done
}
# Fold the SF-DMD student's action CFG (scale 5) into one pass: the student alone hardly follows the keys.
stage_still() {
    # The still prior and the camera warp (docs/world_controls.md, second sitting): stacking, the stacked frame
    # moved by each key's measured camera motion, the velocity predicted on top of "nothing moved but the
    # camera", overlapping patches; action CFG 1 everywhere (guidance would push the view past the key's move).
    warp_recipe still "${STILL_TEACHER_STEPS:-1000}"
}
stage_walk() {
    # Walking (docs/world_controls.md, fourth sitting): the still recipe, with the keys' running average as a
    # condition (Doom keeps 0.906 of the speed per tic: 0.82 per recorded frame of 2 tics) and the average
    # moving the stacked frame by the per-pixel flow of walking (the floor and ceiling streaming past).
    warp_recipe walk "${WALK_TEACHER_STEPS:-1000}" --action-momentum 0.82 --camera-flow
    # Then SF-DMD again from the SF-DMD student, on its own 24-frame rollouts scored in the teacher's 6-frame
    # windows (docs/world_controls.md, fifth sitting; not shipped: its long play melts into a flat texture).
    local S=$RUNS/walk
    [[ -f $S/dmd_long/bundle/config.json ]] || timed walk_dmd_long "$FK" train dmd --bundle "$S/dmd/bundle" \
        --teacher "$S/teacher/bundle" --out "$S/dmd_long" --steps "${WALK_LONG_STEPS:-150}" --lr 1e-5 --critic-lr 2e-4 \
        --critic-steps 5 --guidance 1.0 --rollout-chunks 24 "${STUDENT[@]}"
}
stage_rest() {
    # The walk recipe with noise added to the stacked frame (x + l n) instead of mixed in ((1 - l) x + l n): the
    # mixed form taught the still prior to scale the frame back up, which a model fed its own frames compounds
    # until a still view runs away (docs/world_controls.md, sixth sitting). Best on data with idle stretches
    # (record with IDLE_PROB=0.06).
    warp_recipe rest "${REST_TEACHER_STEPS:-1000}" --action-momentum 0.82 --camera-flow --stack-noise-form add
}
stage_told() {
    # The rest recipe with the model told the stacked frame's noise level (--stack-noise-condition, GameNGen): a
    # level-blind model shrinks every stacked frame toward the mean to hedge against the noise, even the clean
    # ones a session feeds it, so a still view faded (docs/world_controls.md, seventh sitting). CAMERA_FOV turns
    # the stacked frame as a pinhole camera of that field of view turns (--camera-fov; "measured": `eval camera`'s
    # on the held-out recordings; unset: a translation, as the committed told models were trained).
    local fov=${CAMERA_FOV:-}
    [[ $fov == measured ]] && fov=$(measured_fov)
    warp_recipe told "${TOLD_TEACHER_STEPS:-1000}" --action-momentum 0.82 --camera-flow --stack-noise-form add \
        --stack-noise-condition ${fov:+--camera-fov "$fov"}
}
# The field of view that best explains the recorded turns (`forcekit eval camera`, cached in $RUNS/camera.json);
# empty when the recordings hold too few steady turns to tell.
measured_fov() {
    [[ -s $RUNS/camera.json ]] || "$FK" eval camera --data "$HELDOUT" --json > "$RUNS/camera.json"
    grep -o '"fov": [0-9.]*' "$RUNS/camera.json" | cut -d' ' -f2 || true
}
stage_sharp() {
    # The told recipe's dCM student self-forced on 48-frame rollouts of its own frames with a regression term toward
    # the recorded ones (tenth sitting: the keyed long play holds, but the frames blur), then the teacher's decoder
    # fine-tuned against a patch discriminator with its encoder frozen, on latents mixed toward their local average
    # as a one-step student draws them (eleventh sitting), swapped into the student's bundle. TOLD_TEACHER and
    # TOLD_DCM default to the told stage's runs (the committed models/health_gathering_teacher_told and
    # models/health_gathering_told_dcm are the same recipe).
    local S=$RUNS/told T=${TOLD_TEACHER:-$RUNS/told/teacher/bundle} D=${TOLD_DCM:-$RUNS/told/dcm/bundle}
    [[ -f $S/dmd_long/bundle/config.json ]] || timed told_dmd_long "$FK" train dmd --bundle "$D" --teacher "$T" \
        --out "$S/dmd_long" --steps "${SHARP_DMD_STEPS:-200}" --lr 1e-5 --critic-lr 2e-4 --critic-steps 5 \
        --guidance 1.0 --rollout-chunks 48 --regression-weight 2 --sample-steps 1 "${STUDENT[@]}"
    [[ -f $S/decoder/eval.json ]] || {
        timed told_decoder "$FK" train codec --data "$TRAIN" --out "$S/decoder" --init "$T" --freeze-encoder \
            --adversarial-weight "${DECODER_ADVERSARIAL:-2.0}" --latent-blur 0.5 --edge-weight 0.5 \
            --steps "${DECODER_STEPS:-8000}" --batch 16 --lr 2e-4 --threads "$THREADS"
        "$FK" eval codec --codec "$S/decoder" --data "$HELDOUT" --json --threads 1 > "$S/decoder/eval.json"
    }
    [[ -f $S/sharp/config.json ]] || "$FK" ship --bundle "$S/dmd_long/bundle" --decoder "$S/decoder" --out "$S/sharp" \
        --start-data "$HELDOUT" --scenes 8 --scene-frames 4 --steps 1 --seed 1 --name told_sharp
    mkdir -p "$RUNS/eval" "$RUNS/controls"
    for row in "told_dmd_long_1 $S/dmd_long/bundle" "told_sharp_1 $S/sharp"; do
        set -- $row
        eval_row "$1" "$2" 1
        controls_row "$1" "$2" 1
    done
}
stage_gate() {
    # The told teacher of models/health_gathering_teacher_told (its edge-loss codec, 2,000 steps) with the rest gate: a
    # learned gate of each frame's conditioning on the residual over the still prior, which can close where nothing
    # moves, and no action dropout (a zeroed clip that moves would teach the gate that rest moves); its dCM student
    # told the stack-noise level, shipped at 1 step (docs/world_controls.md, twelfth sitting).
    local S=$RUNS/gate T=$RUNS/gate/teacher/bundle
    [[ -f $T/config.json ]] || timed gate_teacher "$FK" train teacher --data "$TRAIN" \
        --codec "${TOLD_TEACHER:-models/health_gathering_teacher_told}" --out "$S/teacher" \
        --steps "${GATE_TEACHER_STEPS:-2000}" --batch 8 --clip-frames 6 --layers 6 --heads 4 --head-dim 32 --ffn 512 \
        --patch 2 --guidance 1.0 --threads "$THREADS" --device "$DEVICE" --stack-frames 1 --stack-noise 0.3 \
        --timestep-shift 3 --still-prior 0.5 --patch-overlap 1 --camera-warp --action-momentum 0.82 --camera-flow \
        --stack-noise-form add --stack-noise-condition --rest-gate --action-dropout 0
    [[ -f $S/dcm/bundle/config.json ]] || timed gate_dcm "$FK" train dcm --bundle "$T" --out "$S/dcm" \
        --steps "${WARP_DCM_STEPS:-300}" --lr 1e-4 --guidance 1.0 --stack-noise 0.3 "${STUDENT[@]}"
    [[ -f $S/dcm_1/config.json ]] || "$FK" ship --bundle "$S/dcm/bundle" --out "$S/dcm_1" --start-data "$HELDOUT" \
        --scenes 8 --scene-frames 4 --steps 1 --seed 1
    mkdir -p "$RUNS/eval" "$RUNS/controls"
    eval_row gate_dcm_1 "$S/dcm_1" 1
    controls_row gate_dcm_1 "$S/dcm_1" 1
}
# A camera-warp teacher NAME (TEACHER_STEPS, extra teacher flags) and its students, with their quality and control rows.
warp_recipe() {
    local name=$1 steps=$2; shift 2
    local S=$RUNS/$name
    local T=$S/teacher/bundle
    [[ -f $T/config.json ]] || timed "${name}_teacher" "$FK" train teacher --data "$TRAIN" --codec "$CODEC" \
        --out "$S/teacher" --steps "$steps" --batch "${WARP_TEACHER_BATCH:-8}" --clip-frames 6 --layers 6 --heads 4 \
        --head-dim 32 --ffn 512 --patch 2 --guidance 1.0 --threads "$THREADS" --device "$DEVICE" --stack-frames 1 \
        --stack-noise 0.3 --timestep-shift 3 --still-prior 0.5 --patch-overlap 1 --camera-warp \
        --max-seconds "${WARP_TEACHER_MAX_SECONDS:-0}" "$@"
    # The stacking teacher already plays frame by frame in a causal session as it samples (docs/world_controls.md,
    # fifth sitting), so by default dCM distils it directly: the causal stage (WARP_CAUSAL_STEPS > 0) lost half
    # of its turns and two thirds of its walk.
    local base=$T rows=()
    if [[ ${WARP_CAUSAL_STEPS:-0} -gt 0 ]]; then
        [[ -f $S/causal/bundle/config.json ]] || timed "${name}_causal" "$FK" train causal --bundle "$T" \
            --out "$S/causal" --steps "$WARP_CAUSAL_STEPS" --lr 2e-4 --stack-noise 0.3 "${STUDENT[@]}"
        base=$S/causal/bundle rows=("${name}_causal_10 $S/causal/bundle 10")
    fi
    [[ -f $S/dcm/bundle/config.json ]] || timed "${name}_dcm" "$FK" train dcm --bundle "$base" \
        --out "$S/dcm" --steps "${WARP_DCM_STEPS:-300}" --lr 1e-4 --guidance 1.0 "${STUDENT[@]}"
    [[ -f $S/dmd/bundle/config.json ]] || timed "${name}_dmd" "$FK" train dmd --bundle "$S/dcm/bundle" --teacher "$T" \
        --out "$S/dmd" --steps "${WARP_DMD_STEPS:-200}" --lr 1e-5 --critic-lr 2e-4 --critic-steps 5 --guidance 1.0 \
        "${STUDENT[@]}"
    [[ ${WARP_EVAL:-1} == 1 ]] || return 0   # the GPU recipe runs the evaluations itself, in parallel
    [[ -f $S/gap_teacher.json ]] || "$FK" eval gap --bundle "$T" --data "$HELDOUT" --latents-cache "$RUNS/teacher" \
        > "$S/gap_teacher.json"
    mkdir -p "$RUNS/eval" "$RUNS/controls"
    [[ -f $RUNS/controls/${name}_teacher_8.json ]] || "$FK" eval controls --bundle "$T" --env $ENV_NAME --episodes 4 \
        --still 16 --mode bidirectional --steps 8 --guidance 1.0 --threads 1 --json \
        --out "$RUNS/controls/${name}_teacher_8.json" > /dev/null
    [[ -f $RUNS/controls/${name}_teacher_session_8.json ]] || "$FK" eval controls --bundle "$T" --env $ENV_NAME \
        --episodes 4 --still 16 --mode session --steps 8 --guidance 1.0 --threads 1 --json \
        --out "$RUNS/controls/${name}_teacher_session_8.json" > /dev/null
    rows+=("${name}_dcm_2 $S/dcm/bundle 2" "${name}_dmd_1 $S/dmd/bundle 1" "${name}_dmd_2 $S/dmd/bundle 2")
    for row in "${rows[@]}"; do
        set -- $row
        eval_row "$1" "$2" "$3"
        controls_row "$1" "$2" "$3"
    done
}
stage_guidance() {
    [[ -f $RUNS/guidance/bundle/config.json ]] && return
    timed guidance "$FK" train guidance --bundle "$RUNS/dmd/bundle" --out "$RUNS/guidance" --sample-steps 1 \
        --guidance 5.0 --steps 300 --lr 5e-5 "${STUDENT[@]}"
}
# Does each model follow the keys? (forcekit eval controls, 8 held-out starts)
stage_controls() {
    mkdir -p "$RUNS/controls"
    for row in "dmd_1 $RUNS/dmd/bundle 1" "dmd_1_g5 $RUNS/dmd/bundle 1 --guidance 5.0" "dcm_2 $RUNS/dcm/bundle 2" \
               "causal_20 $RUNS/causal/bundle 20" "guidance_1 $RUNS/guidance/bundle 1"; do
        set -- $row
        controls_row "$@"
    done
}
stage_ship() {
    # The previous default (until 2026-12-07): the guidance-distilled SF-DMD student at 1 step, with 8 real start
    # scenes from held-out episodes. Its card (models/health_gathering_guided/card.md) holds the figures of our run.
    "$FK" ship --bundle "$RUNS/guidance/bundle" --out models/health_gathering_guided --start-data "$HELDOUT" \
        --scenes 8 --scene-frames 4 --steps 1 --seed 1 --card models/health_gathering_guided/card.md \
        --name health_gathering_guided
}
refine_train_ship() {
    # The shipped default: the told SF-DMD student (TOLD_SF: the committed models/health_gathering_told_sf, or the
    # sharp stage's $RUNS/told/dmd_long/bundle) with a frame refiner after its decoder, trained on its own chains and
    # on rest chains (docs/world_controls.md, thirteenth sitting). Rest chains need stretches where the engine stands
    # still: our run had TRAIN=$DATA/hg_train_idle, recorded with IDLE_PROB=0.06. Shipped to DEFAULT_OUT (default
    # models/default) with the shown frame's texture carried with the view on a canvas past its edges
    # (--detail-sigma, --detail-margin: fourteenth and fifteenth sittings), turned as the recorded turns show the
    # camera turns (--detail-fov: `eval camera`'s best field of view, unless DETAIL_FOV says; sixteenth sitting).
    # The card holds our figures.
    local F=${TOLD_SF:-models/health_gathering_told_sf} S=$RUNS/refine
    local fov=${DETAIL_FOV:-$(measured_fov)}
    [[ -f $S/codec.json && -f $S/done ]] || { timed refiner "$FK" train refiner --data "$TRAIN" --out "$S" --init "$F" \
        --motion "$F" --student "$F" --student-chains "${STUDENT_CHAINS:-1024}" --rest-chains "${REST_CHAINS:-256}" \
        --rest-skip 256 --adversarial-weight 0.5 --steps "${REFINER_STEPS:-1200}" --threads "${REFINER_THREADS:-1}" \
        --device "$DEVICE" && touch "$S/done"; }
    "$FK" ship --bundle "$F" --decoder "$S" --out "${DEFAULT_OUT:-models/default}" --start-data "$HELDOUT" --scenes "${SCENES:-8}" \
        --scene-frames 4 --steps 1 --seed 1 --detail-sigma "${DETAIL_SIGMA:-1.75}" --detail-margin "${DETAIL_MARGIN:-32}" \
        --detail-fov "${fov:-0}" --card models/default/card.md --name default
}
stage_refine() {
    refine_train_ship
    mkdir -p "$RUNS/eval" "$RUNS/controls"
    eval_row default_1 "${DEFAULT_OUT:-models/default}" 1
    controls_row default_1 "${DEFAULT_OUT:-models/default}" 1
}
long_train_ship() {
    # The shipped default since the eighteenth sitting: the refine stage's student (TOLD_SF) self-forced for
    # LONG_STEPS more SF-DMD steps on LONG_ROLLOUT-frame rollouts (128), on recordings whose keys are held up to 48
    # frames (LONG, recorded here; the training data holds them up to 12), with the refine stage's refiner: under
    # random keys the refine stage's default collapses into a tiled texture within 10,000 frames for three key seeds
    # of five (docs/world_controls.md, eighteenth sitting). Our run shipped models/default's refiner
    # (DECODER=models/default).
    local F=${TOLD_SF:-models/health_gathering_told_sf} S=$RUNS/long LONG=${LONG:-$DATA/hg_long}
    local fov=${DETAIL_FOV:-$(measured_fov)}
    [[ -f $LONG/meta.json ]] || timed record_long "$FK" record --env $ENV_NAME --episodes "${LONG_EPISODES:-160}" \
        --seed 50000 --out "$LONG" --idle-prob 0.06 --max-frames "${MAX_FRAMES:-1000}" --max-hold 48 --jobs "$RECORD_JOBS"
    [[ -f $S/dmd/bundle/config.json ]] || timed long_dmd "$FK" train dmd --bundle "$F" \
        --teacher "${TOLD_TEACHER:-models/health_gathering_teacher_told}" --out "$S/dmd" --steps "${LONG_STEPS:-120}" \
        --lr 1e-5 --critic-lr 2e-4 --critic-steps 5 --guidance 1.0 --rollout-chunks "${LONG_ROLLOUT:-128}" \
        --regression-weight 2 --sample-steps 1 --batch 8 --clip-frames 6 --data "$LONG" --heldout "$HELDOUT" \
        --threads "$THREADS" --device "$DEVICE" --ckpt-every-s 120 --eval-every 40
    "$FK" ship --bundle "$S/dmd/bundle" --decoder "${DECODER:-$RUNS/refine}" --out "${DEFAULT_OUT:-models/default}" \
        --start-data "$HELDOUT" --scenes "${SCENES:-8}" --scene-frames 4 --steps 1 --seed 1 \
        --detail-sigma "${DETAIL_SIGMA:-1.75}" --detail-margin "${DETAIL_MARGIN:-32}" --detail-fov "${fov:-0}" \
        --card models/default/card.md --name default
}
stage_long() {
    long_train_ship
    mkdir -p "$RUNS/eval" "$RUNS/controls"
    eval_row default_long_1 "${DEFAULT_OUT:-models/default}" 1
    controls_row default_long_1 "${DEFAULT_OUT:-models/default}" 1
}
stage_bench() {
    mkdir -p "$RUNS/bench"
    for s in 1 2; do
        for t in 1 2; do
            [[ -f $RUNS/bench/default_${s}_t$t.json ]] || "$FK" bench runtime --bundle models/default --steps $s \
                --frames 256 --threads $t --json --no-uncached > "$RUNS/bench/default_${s}_t$t.json"
        done
    done
    [[ -f $RUNS/bench/dcm_2.json ]] || "$FK" bench runtime --bundle "$RUNS/dcm/bundle" --steps 2 --frames 256 \
        --threads 1 --json --no-uncached > "$RUNS/bench/dcm_2.json"
}
stage_longplay() {
    # five random key sequences (one holds where another collapses), and forward held (a wall the model cannot draw)
    [[ -f $RUNS/longplay.json ]] && return
    OMP_NUM_THREADS=1 "$FK" eval longplay --bundle models/default --frames 10000 --policies noop,random --seeds 5 \
        --probe "$RUNS/probe" --plot "$RUNS/longplay.png" --json > "$RUNS/longplay.json"
    OMP_NUM_THREADS=1 "$FK" eval longplay --bundle models/default --frames 1000 --policies hold:forward,hold:backward \
        --json > "$RUNS/longplay_hold.json"
}

[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0   # sourced (scripts/gpu_recipe.sh): the stages only
mkdir -p "$RUNS"
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(record codec teacher probe causal dcm dmd guidance eval controls ship refine long bench longplay)
for s in "${stages[@]}"; do
    log "stage $s"
    "stage_$s"
done
log done
