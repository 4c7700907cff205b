#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install drgnflow with the workflow
# and test extras. Safe to run repeatedly. Usage: bash scripts/setup.sh [--run-only]
# --run-only (scripts/demo.sh uses it): only what running the workflow needs, no test tools and no
# browser for the tests: a first demo then spends no minutes on apt-get and the dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_ONLY=$([ "${1:-}" = "--run-only" ] && echo 1 || echo "")
EXTRAS=$([ -n "$RUN_ONLY" ] && echo workflow || echo workflow,dev)
PY=${PYTHON:-python3}
# drgn explore's browser tests drive Debian's chromium through Playwright (never `playwright install`).
if [ -z "$RUN_ONLY" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends chromium; } ||
    echo "warning: could not install chromium (needs root or sudo); tests/test_explore.py will be skipped" >&2
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# uv installs the same packages as pip about five times faster (on the 2-core machine, with warm caches:
# 16 s instead of 95 s), which is most of a first demo's set-up. pip remains the fallback. uv does not read
# pip's configuration, so pip's find-links and constraint files (where a machine keeps local wheels, such
# as a CPU build of torch) are handed to it.
UV=""
if [ -z "${DRGN_NO_UV:-}" ]; then
  UV=$(command -v uv || true)
  if [ -z "$UV" ] && .venv/bin/python -m pip install -q uv 2>/dev/null; then UV=.venv/bin/uv; fi
fi
TORCH=()
# torch first (pip) or in the same resolution (uv), pinned, so that the torch range in pyproject.toml does
# not pull the newest (multi-GB CUDA) build. Set DRGN_TORCH_SPEC to choose another build, e.g.
# "torch==2.13.0" on a GPU box gets the CUDA wheel from PyPI.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  TORCH=("${DRGN_TORCH_SPEC:-torch==2.13.0}")
fi
if [ -n "$UV" ]; then
  mapfile -t PIP_OPTS < <(.venv/bin/python scripts/pip_options_for_uv.py)
  "$UV" pip install -q --python .venv/bin/python "${PIP_OPTS[@]}" "${TORCH[@]}" -e ".[$EXTRAS]"
else
  .venv/bin/python -m pip install -q --upgrade pip
  if [ ${#TORCH[@]} -gt 0 ]; then .venv/bin/python -m pip install -q "${TORCH[@]}"; fi
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
fi
# Compile what drgn_core imports, once (uv compiles nothing; with PYTHONDONTWRITEBYTECODE set, every job of
# a workflow would otherwise compile its imports again): see scripts/precompile.py.
.venv/bin/python scripts/precompile.py
echo "drgnflow installed in $(pwd)/.venv — activate with: source .venv/bin/activate"
