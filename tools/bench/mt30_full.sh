#!/usr/bin/env bash
# The full-size MT30 run of BENCHMARKS.md §13: make, build, info, verify on 690,000 episodes.
#   bash tools/bench/mt30_full.sh WORK [STEP ...]
# Each step writes WORK/log/STEP.log (its output and /usr/bin/time -v: wall time, peak RSS)
# and WORK/log/STEP.done when it finishes; a rerun skips finished steps, so after a crash or
# a reboot the same command goes on. Default steps: make build info verify verify-deep.
# Needs ~44 GB for the chunks and ~20 GB for the Zarr store (df -h WORK first).
set -euo pipefail
work=${1:?usage: mt30_full.sh WORK [STEP ...]}
shift
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(make build info verify verify-deep)
mkdir -p "$work/log"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
py=${PYTHON:-.venv/bin/python}

run() {  # run STEP COMMAND...: once, timed, logged
  local step=$1
  shift
  if [ -e "$work/log/$step.done" ]; then
    echo "$step: done before ($work/log/$step.log)"
    return
  fi
  echo "$step: $(date -u +%H:%M:%S) $*" | tee "$work/log/$step.log"
  df -h "$work" | tail -1 >>"$work/log/$step.log"
  uptime >>"$work/log/$step.log"
  /usr/bin/time -v "$@" >>"$work/log/$step.log" 2>&1
  echo "$step: $(date -u +%H:%M:%S) finished" | tee -a "$work/log/$step.log"
  df -h "$work" | tail -1 >>"$work/log/$step.log"
  touch "$work/log/$step.done"
}

for step in "${steps[@]}"; do
  case $step in
    make) run make "$py" -m tools.cli make-mt30 --like mt30 --dst "$work/mt30" ;;
    build) run build "$py" -m datapipe.cli build --src "$work/mt30" --dst "$work/zarr" \
      --format zarr --workers 2 ;;
    info) run info "$py" -m datapipe.cli info "$work/zarr" ;;
    verify) run verify "$py" -m tools.cli verify-shards "$work/zarr" --src "$work/mt30" ;;
    verify-deep) run verify-deep "$py" -m tools.cli verify-shards "$work/zarr" --src "$work/mt30" --deep ;;
    build-wds) run build-wds "$py" -m datapipe.cli build --src "$work/mt30" --dst "$work/wds" \
      --format webdataset --workers 2 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
