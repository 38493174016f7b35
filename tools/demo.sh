#!/usr/bin/env bash
# The main job, end to end on the real-physics sample in data/, as a tiny experiment: build
# the store, verify it, train a small teacher, then `trainer experiment experiments/demo.toml`
# (from scratch vs distilled, the teacher as a reference row) and its report.
# Usage: bash tools/demo.sh   (writes runs/demo/, recreated on every run)
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out=runs/demo
rm -rf "$out"
set -x
datapipe build --src data/mt30-sample --dst $out/shards --format both --workers 2
datapipe info $out/shards
tools verify-shards $out/shards --src data/mt30-sample
# The teacher: a 1M model trained on the sample for 2x the students' steps.
trainer train --shards $out/shards --out $out/teacher-run --steps 600 --batch-size 64 \
  --cache-gb 0.1 --log-every 100 --save-every 600 --threads 1
trainer export $out/teacher-run/checkpoint.pt --out $out/teacher.pt
trainer experiment experiments/demo.toml --out $out/experiment --jobs 2
set +x
sed -n '1,/^## Figures/p' $out/experiment/report.md | head -n 40
cat <<'MSG'

This demo checks the pipeline end to end (build -> verify -> train -> distil -> evaluate ->
report) on 90 sample episodes, 300 steps at batch 64, one seed and one episode per task.
At this size its scores are noise, not a result: see RESULTS.md for the study and
runs/demo/experiment/report.md for everything this run measured.

Next: the CPU study on real physics (about 10 min of data, then ~1.2 core-hours per run,
6 runs), in the project's virtualenv:
  . .venv/bin/activate
  TEACHER2=0 bash experiments/cpu-study-data.sh
  trainer experiment experiments/cpu-study-10k.toml --out runs/cpu-study-10k --jobs 2
MSG
