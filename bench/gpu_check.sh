#!/usr/bin/env bash
# The GPU checks of drgnflow's training, as one command for any CUDA machine.
#
#   bash bench/gpu_check.sh [OUTDIR]          # OUTDIR defaults to results/gpu_check
#
# Needs: an NVIDIA GPU with its driver, Python >= 3.11 with a CUDA build of torch, and drgnflow's other
# dependencies. Either they are installed (e.g. `DRGN_TORCH_SPEC=torch==2.13.0 bash scripts/setup.sh`, then
# this script uses .venv), or, on a machine without network access, they come as wheels in .whl/, made on
# a machine with network access by scripts/gpu_wheels.sh and copied along with the checkout; those are
# installed into a scratch folder ($WHEEL_SITE), never into the system's Python.
#
# It runs, within about 10 minutes:
#   1. tests/test_gpu.py: the GPU paths (fp16 stack on the device, pinned-memory stream, fp32 and bf16
#      losses, encode, volumes, resume) against the CPU;
#   2. tests/test_train_accuracy.py and tests/test_models.py: the CI-size accuracy tests, which train on the
#      GPU there (device auto, bf16 autocast);
#   3. bench/train_throughput.py on the GPU, against cryoDRGN when a `cryodrgn` command is found (on PATH,
#      in $CRYODRGN, or from the wheels of `scripts/gpu_wheels.sh --cryodrgn`): one JSON line per
#      (D, architecture) as soon as it is measured, cut at $THROUGHPUT_SECONDS.
#
# Writes into OUTDIR: gpu.txt (nvidia-smi, versions), tests.log, throughput.jsonl.
# Settings (environment): PYTHON (interpreter; default .venv/bin/python if present, else python3),
# TEST_SECONDS (200), THROUGHPUT_SECONDS (300), THROUGHPUT_D ("64 128 256"), WHEEL_SITE
# (${TMPDIR:-/tmp}/drgn_gpu_site), CRYODRGN (path of a cryodrgn command).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-results/gpu_check}
mkdir -p "$OUTDIR"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg

# drgnflow's own imports; when one is missing, install the carried wheels into a scratch folder
if ! "$PYTHON" -c "import numpy, scipy, pandas, yaml, tqdm, mrcfile, starfile, cryosparc, pytest" \
    2>/dev/null; then
  WHEEL_SITE=${WHEEL_SITE:-${TMPDIR:-/tmp}/drgn_gpu_site}
  ls .whl/*.whl >/dev/null 2>&1 || {
    echo "drgnflow's dependencies are missing and there is no .whl/: install them, or run" \
         "scripts/gpu_wheels.sh on a machine with network access and copy .whl/ here"; exit 1; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WHEEL_SITE" .whl/*.whl || { echo "installing the wheels in .whl/ failed"; exit 1; }
  export PYTHONPATH=$WHEEL_SITE:$PWD
  [ -x "$WHEEL_SITE/bin/cryodrgn" ] && CRYODRGN=${CRYODRGN:-$WHEEL_SITE/bin/cryodrgn}
fi
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "torch sees no CUDA GPU here (torch build or driver): nothing to check"; exit 1; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
                'bf16', torch.cuda.is_bf16_supported())"; } > "$OUTDIR/gpu.txt" 2>&1
cat "$OUTDIR/gpu.txt"

timeout "${TEST_SECONDS:-200}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  tests/test_train_accuracy.py tests/test_models.py 2>&1 | tee "$OUTDIR/tests.log"

peer=()
CRYODRGN=${CRYODRGN:-$(command -v cryodrgn || true)}
[ -n "$CRYODRGN" ] && [ -x "$CRYODRGN" ] && peer=(--cryodrgn "$CRYODRGN")
timeout "${THROUGHPUT_SECONDS:-300}" "$PYTHON" bench/train_throughput.py --device cuda --threads 8 \
  --D ${THROUGHPUT_D:-64 128 256} --arch 256x3 1024x3 --precision fp32 bf16 --epochs 2 \
  --seconds 8 --gflops 20000 --max-images 20000 --workdir "${TMPDIR:-/tmp}/drgn_tp" "${peer[@]}" \
  2>&1 | grep '^{"D"' | tee "$OUTDIR/throughput.jsonl"
