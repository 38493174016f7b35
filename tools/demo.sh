#!/usr/bin/env bash
# The main job, end to end on the real-physics sample in data/: build the store, verify it,
# make a small teacher, distill a 1M student from it, export and evaluate the student.
# Usage: bash tools/demo.sh [OUT_DIR]   (default runs/demo, recreated on every run)
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out=${1:-runs/demo}
if [ -e "$out" ] && [ "$out" != runs/demo ]; then
  echo "$out exists: pass a new OUT_DIR" >&2
  exit 1
fi
rm -rf runs/demo
set -x
datapipe build --src data/mt30-sample --dst "$out/shards" --format both --workers 2
datapipe info "$out/shards"
tools verify-shards "$out/shards" --src data/mt30-sample
tools make-teacher --size 5 --out "$out/teacher.pt" --train-steps 100 --shards "$out/shards"
trainer distill --shards "$out/shards" --teacher "$out/teacher.pt" --steps 200 --batch-size 64 \
  --d-coef 0.4 --out "$out/distill" --cache-gb 0.1 --no-progress
trainer export "$out/distill/checkpoint.pt" --out "$out/student.pt"
trainer eval --checkpoint "$out/student.pt" --tasks mt30 --episodes 1 --no-mpc --out "$out/eval"
