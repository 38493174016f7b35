#!/usr/bin/env bash
# Data of experiments/cpu-study-scarce-{2,8}.toml: the CPU study's training data cut down to
# its first 2 and 8 episodes per task, regenerated deterministically into
# runs/cpu-study-data/ (kept out of git). About 4 min of the 2-core development VM after
# experiments/cpu-study-data.sh, which it runs first (data, held-out episodes, teacher).
#
#   bash experiments/cpu-study-scarce-data.sh [PATH/TO/mt30_1M_steps_045dist_fp16.pt]
#
# An episode is a pure function of (seed, task, episode index) (tools/rollouts.py), so
# `--episodes-per-task 8 --seed 0` writes exactly the first 8 episodes of every task of the
# 40-episode set: the three sizes are nested, with the same behaviour policy and noise cycle
# (0.1 / 0.3 / 0.6 / 1.0; at 2 episodes per task only the two lowest noise levels).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TEACHER2=0 bash experiments/cpu-study-data.sh "$@"
d=runs/cpu-study-data
for n in 2 8; do
  [ -f $d/train-$n/chunk_0.pt ] || tools make-mt30 --physics dmc --dst $d/train-$n \
    --episodes-per-task $n --chunks 1 --seed 0 --policy $d/teacher-fp16.pt \
    --noise 0.1,0.3,0.6,1.0 --workers 2 --no-progress
  [ -f $d/store-$n/meta.json ] || datapipe build --src $d/train-$n --dst $d/store-$n \
    --format zarr --workers 2 --no-progress
  tools verify-shards $d/store-$n --src $d/train-$n
done
