#!/usr/bin/env bash
# The scarce-data study of RESULTS.md, end to end: its data, the experiments at 2 and 8
# episodes per task, the curve against the CPU study's 40, and the committed results folder.
# About 4 core-hours of the 2-core development VM (--jobs 2, one torch thread per run);
# resumable: run it again after an interruption.
#
#   bash experiments/cpu-study-scarce.sh [PATH/TO/mt30_1M_steps_045dist_fp16.pt]   # in the venv
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash experiments/cpu-study-scarce-data.sh "$@"    # [PATH/TO/mt30_1M_steps_045dist_fp16.pt]
for n in 2 8; do
  trainer experiment experiments/cpu-study-scarce-$n.toml --out runs/cpu-study-scarce-$n --jobs 2
done
out=results/cpu-study-scarce
trainer curve --point 2=runs/cpu-study-scarce-2 --point 8=runs/cpu-study-scarce-8 \
  --point 40=results/cpu-study --arm distill-0.4 --out $out
for n in 2 8; do  # each experiment's report, figures and every evaluation row
  mkdir -p $out/$n
  cp -r runs/cpu-study-scarce-$n/report.md runs/cpu-study-scarce-$n/report.json \
    runs/cpu-study-scarce-$n/figures $out/$n/
  for run in runs/cpu-study-scarce-$n/*/seed*; do
    name=$(basename "$(dirname "$run")")-$(basename "$run")
    cp "$run/evals.csv" "$out/$n/$name-evals.csv"
    cp "$run/evals.jsonl" "$out/$n/$name-evals.jsonl"
  done
done
