#!/usr/bin/env bash
# Data and teachers of experiments/cpu-study.toml, regenerated deterministically into
# runs/cpu-study-data/ (kept out of git). About 10 min of the 2-core development VM for the
# data, plus ~1 h of one core for the second teacher.
#
#   bash experiments/cpu-study-data.sh [PATH/TO/mt30_1M_steps_045dist_fp16.pt]
#   TEACHER2=0 bash experiments/cpu-study-data.sh    # data only (experiments/cpu-study-10k.toml)
#
# The argument is the paper's released distilled 1M checkpoint (TD-MPC-Opt's
# mt30_1M_steps_045dist_fp16.pt, sha256 3e354897...5955bfb). It is the behaviour policy of
# the data and the study's frozen teacher.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
real=${1:-../shared/fixtures/td-mpc-opt/mt30_1M_steps_045dist_fp16.pt}
d=runs/cpu-study-data
mkdir -p $d
cp "$real" $d/teacher-fp16.pt
echo "3e35489756abf6e0e244371698d063487f70ffb5d109e3d8c84ae7dda5955bfb  $d/teacher-fp16.pt" | sha256sum -c -
# Real physics, all 30 tasks: the real checkpoint's policy mean plus Gaussian noise, the std
# cycling over 0.1 / 0.3 / 0.6 / 1.0 from episode to episode (near-expert to near-random).
# Training data: seed 0, 40 episodes per task; held-out episodes: seed 1, 4 per task.
noise=0.1,0.3,0.6,1.0
[ -f $d/train/chunk_1.pt ] || tools make-mt30 --physics dmc --dst $d/train --episodes-per-task 40 \
  --chunks 2 --seed 0 --policy $d/teacher-fp16.pt --noise $noise --workers 2
[ -f $d/heldout/chunk_0.pt ] || tools make-mt30 --physics dmc --dst $d/heldout --episodes-per-task 4 \
  --chunks 1 --seed 1 --policy $d/teacher-fp16.pt --noise $noise --workers 2
[ -f $d/store/meta.json ] || datapipe build --src $d/train --dst $d/store --format zarr --workers 2
tools verify-shards $d/store --src $d/train
[ "${TEACHER2:-1}" = 0 ] && exit 0
# The second teacher: a 1M model trained on the same data for 12,000 steps (4x the
# students' 3,000 steps), so that it knows more of this data than a student can learn in its budget.
resume=(); [ -f $d/teacher2-run/checkpoint.pt ] && resume=(--resume)
trainer train --shards $d/store --out $d/teacher2-run --steps 12000 --batch-size 256 --seed 100 \
  --save-every 1000 --log-every 100 --eval-every 4000 --eval-episodes 4 --threads 1 --device cpu \
  --no-progress "${resume[@]}"
trainer export $d/teacher2-run/checkpoint.pt --out $d/teacher2.pt
