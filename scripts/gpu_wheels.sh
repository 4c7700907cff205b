#!/usr/bin/env bash
# Download into .whl/ the wheels a GPU machine without network access needs for bench/gpu_check.sh.
#
#   bash scripts/gpu_wheels.sh [--cryodrgn] [--all]
#
# Run it on any machine with network access; copy .whl/ to the GPU machine with the checkout. The GPU
# machine must already have Python and a CUDA build of torch (the wheels here never include torch).
# By default this fetches what a stock PyTorch environment (torch with numpy, scipy, pandas, pyarrow,
# scikit-learn, matplotlib, pyyaml, tqdm, pytest) lacks for drgnflow's training path and its GPU tests:
# mrcfile, starfile and cryosparc-tools (the simulator writes .cs files with its Dataset).
#   --all       every runtime dependency of drgnflow (from pyproject.toml) but torch, with their own
#               dependencies, plus pytest: for a machine holding only Python and torch.
#   --cryodrgn  also cryoDRGN 4.3.1, the optional peer of bench/train_throughput.py, and the modules its
#               command line imports beyond a stock PyTorch environment.
# The target is chosen by TARGET_PY (the GPU machine's Python version, default this machine's python3's)
# and TARGET_PLATFORMS (default: the manylinux x86-64 tags). About 35 MB with --cryodrgn.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET_PY=${TARGET_PY:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
TARGET_PLATFORMS=${TARGET_PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
  manylinux2014_x86_64 manylinux1_x86_64}
pkgs=(mrcfile starfile cryosparc-tools)
deps=(--no-deps)
peer=()
for arg in "$@"; do
  case "$arg" in
    --all)
      # drgnflow's dependencies except torch, resolved with their own dependencies
      mapfile -t pkgs < <("$PY" -c 'import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.startswith("torch")))')
      pkgs+=(pytest)
      deps=() ;;
    --cryodrgn)
      # fetched without their dependencies: cryoDRGN's own would pull torch
      peer=(cryodrgn==4.3.1 healpy igraph texttable umap-learn pynndescent plotly anywidget nbformat
            traitlets fastjsonschema jsonschema jsonschema-specifications referencing rpds-py flask blinker
            itsdangerous) ;;
    *) echo "usage: bash scripts/gpu_wheels.sh [--cryodrgn] [--all]" >&2; exit 2 ;;
  esac
done
target=(--only-binary=:all: --python-version "$TARGET_PY" --implementation cp)
for p in $TARGET_PLATFORMS; do target+=(--platform "$p"); done
mkdir -p .whl
"$PY" -m pip download -q "${deps[@]}" "${target[@]}" -d .whl "${pkgs[@]}"
if [ ${#peer[@]} -gt 0 ]; then
  "$PY" -m pip download -q --no-deps "${target[@]}" -d .whl "${peer[@]}"
fi
echo "$(ls .whl | wc -l) wheels for Python $TARGET_PY in .whl ($(du -sh .whl | cut -f1));" \
     "copy .whl/ to the GPU machine with the checkout"
