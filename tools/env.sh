# Sourced by demo.sh and test.sh: a project virtualenv with everything installed.
# torch is pinned to 2.13.0 here (a CPU wheel); with a GPU, install the torch build you need first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q torch==2.13.0 -e '.[dev,envs,train,wandb]'
