#!/usr/bin/env bash
# The main job: set up, then run the whole workflow on the embedded demo dataset (simulated by the
# workflow itself) on this machine's CPU cores, and build the HTML report.
# Usage: bash scripts/demo.sh [extra snakemake arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --run-only
export PATH="$(pwd)/.venv/bin:$PATH" MPLBACKEND=Agg
snakemake --profile profiles/local "$@"
snakemake --profile profiles/local --report results/report.html
echo "Report: $(pwd)/results/report.html"
