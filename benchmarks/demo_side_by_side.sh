#!/bin/bash
# The first 8 steps of the demo's earlier config (6 rollout steps, λ_KL 1e-4) and of the current one, side by side,
# interleaved, one torch thread, each in its own process and folder (under $1, default /tmp/demo_side_by_side), with a
# 4-prompt scene evaluation so that only the steps differ; prints fit's wall and CPU time and the rollout and
# training CPU seconds of each (from benchmarks/demo_profile.py's timers). Figures: docs/benchmarks.md.
#   bash benchmarks/demo_side_by_side.sh [OUT_DIR] [ROUNDS]
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/tmp/demo_side_by_side}
ROUNDS=${2:-2}
PY=${PYTHON:-python}
COMMON="-c $ROOT/configs/demo.yaml -c $ROOT/configs/demo_smoke.yaml --model.rollout.group_size=8
 --model.rollout.batch_size=64 --model.nft.micro_batch_size=64 --data.batch_size=8 --data.val_size=16
 --model.evaluation.steps=15 --trainer.max_steps=8 --trainer.val_check_interval=100 --trainer.enable_progress_bar=false"
mkdir -p "$OUT"
for round in $(seq "$ROUNDS"); do
  for arm in earlier current; do
    if [ $arm = earlier ]; then X="--model.rollout.steps=6 --model.nft.kl_weight=0.0001"; else X=""; fi
    rm -rf "$OUT/$arm" && mkdir -p "$OUT/$arm"
    (cd "$OUT/$arm" && PYTHONPATH=$ROOT/src $PY "$ROOT/benchmarks/demo_profile.py" --threads 1 $COMMON $X > out.txt 2>&1)
    echo "round $round $arm: $(grep '^fit:' "$OUT/$arm/out.txt")"
    grep -E "^(rollout|training) " "$OUT/$arm/out.txt" |
      awk '{c[$1] += $(NF-1)} END {for (k in c) printf "  %s CPU %.1f s\n", k, c[k]}'
  done
done
