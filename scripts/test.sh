#!/usr/bin/env bash
# Set up the environment and run the whole test suite (unit, accuracy, workflow and SLURM integration).
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MPLBACKEND=Agg
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
