#!/bin/bash
# The powered accuracy table of issue 21 on a CPU machine, in the background, resumable (bench/README.md,
# "accuracy --size powered"). Runs from a frozen copy of the code in $W/code (make it once with
# `mkdir -p $W/code && git archive <commit> | tar -x -C $W/code`), so edits to a checkout change no run in
# flight. Rerun it to continue: finished steps are reused, an interrupted run resumes from its last
# checkpoint. A family whose benchmark is still running is not started twice.
#
#   bench/run_powered.sh table   # RetinaNet and Faster R-CNN side by side, one torch thread each, nice 15
#   bench/run_powered.sh pilot   # the RetinaNet baseline's AP curve to 3x the student schedule (seed 0)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${W:-$REPO/output/bench_powered}   # the work dir; set W to one outside the checkout to outlive it
PY=${PY:-$REPO/.venv/bin/python}      # the checkout's venv (make install)
cd "$W/code"
export PYTHONPATH=$W/code OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
case "${1:-}" in
  table)
    for family in retinanet faster_rcnn; do
      if pgrep -f -- "bench.accuracy --size powered --families $family " > /dev/null; then
        echo "$family: already running"; continue
      fi
      nohup nice -n 15 "$PY" -m bench.accuracy --size powered --families "$family" --jobs 1 --threads 1 \
        --online-families --ablate --work "$W" --out "$W/accuracy_powered_$family.json" >> "$W/log.txt" 2>&1 &
      echo "$family: started (log $W/log.txt)"
    done ;;
  pilot)
    S=$W/powered/synth
    OUT=$W/pilot/retinanet_baseline_3000
    RESUME=()
    [ -f "$OUT/last_checkpoint" ] && RESUME=(--resume)
    mkdir -p "$W/pilot"
    nohup nice -n 15 "$PY" -m icd train "${RESUME[@]}" --config-file configs/bench/accuracy_retinanet_r18.yaml \
      OUTPUT_DIR "$OUT" SEED 0 MODEL.DEVICE cpu \
      DATASETS.CATALOG.synth_train "[\"$S/annotations/instances_train.json\", \"$S/train\"]" \
      DATASETS.CATALOG.synth_val "[\"$S/annotations/instances_val.json\", \"$S/val\"]" \
      SOLVER.MAX_ITER 3000 SOLVER.STEPS "[2400]" SOLVER.CHECKPOINT_PERIOD 250 SOLVER.WARMUP_ITERS 100 \
      SOLVER.LOG_PERIOD 50 TEST.EVAL_PERIOD 250 MODEL.ANCHOR_GENERATOR.SIZES "[8, 16, 32, 64, 128]" \
      >> "$W/pilot/retinanet_baseline_3000.log" 2>&1 &
    echo "pilot: started (log $W/pilot/retinanet_baseline_3000.log)" ;;
  *) echo "usage: bench/run_powered.sh table|pilot" >&2; exit 2 ;;
esac
