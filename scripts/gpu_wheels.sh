#!/usr/bin/env bash
# Download into .whl/ the wheels that the device tool's GPU machine lacks, for bench/gpu_check.sh.
#
# That machine runs Python 3.12 with torch, numpy, scipy, pandas, pyarrow, scikit-learn, matplotlib,
# pyyaml, tqdm, numba, httpx and pytest, and cannot reach PyPI. drgnflow's training path needs three more:
# mrcfile, starfile, and cryosparc-tools (the simulator writes .cs files with its Dataset). With
# --cryodrgn this also fetches cryoDRGN 4.3.1, the optional peer of bench/train_throughput.py, and the modules its command line imports that the image lacks (found by
# importing `cryodrgn train_vae` in an environment holding only the image's packages). About 35 MB in all.
#
#   bash scripts/gpu_wheels.sh --cryodrgn
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pkgs=(mrcfile starfile cryosparc-tools)
if [ "${1:-}" = "--cryodrgn" ]; then
  pkgs+=(cryodrgn==4.3.1 healpy igraph texttable umap-learn pynndescent plotly anywidget nbformat traitlets
         fastjsonschema jsonschema jsonschema-specifications referencing rpds-py flask blinker itsdangerous)
fi
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pkgs[@]}"
echo "$(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1)); carry \".whl\" in the device call"
