#!/usr/bin/env bash
# The main job, end to end on the sample in data/: build the store, then summarise it.
# Usage: bash tools/demo.sh [OUT_DIR]   (default runs/demo)
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out=${1:-runs/demo}
set -x
datapipe build --src data/mt30-sample --dst "$out/shards" --format both --workers 2
datapipe info "$out/shards"
