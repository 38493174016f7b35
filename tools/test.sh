#!/usr/bin/env bash
# Set up the project virtualenv and run the whole test suite (what CI runs).
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q -rs "$@"  # -rs: each skipped test and what it needs
