#!/usr/bin/env bash
# The GPU checks of drgnflow's training, as one command for the device tool's GPU machine (no network,
# Python 3.12 with torch; our other needs travel as wheels in .whl/, made by scripts/gpu_wheels.sh).
#
#   1. tests/test_gpu.py: the GPU paths (fp16 stack on the device, pinned-memory stream, fp32 and bf16
#      losses, encode, volumes, resume) against the CPU;
#   2. tests/test_train_accuracy.py and tests/test_models.py: the CI-size accuracy tests, which train on the
#      GPU there (device auto, bf16 autocast);
#   3. bench/train_throughput.py on the GPU, against cryoDRGN when its wheels were fetched (--cryodrgn):
#      one JSON line per (D, architecture) as soon as it is measured, cut at $THROUGHPUT_SECONDS.
#
# Here:   bash scripts/gpu_wheels.sh --cryodrgn && echo /.whl/ >> .git/info/exclude
# Device: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# What comes back ($OUT): gpu.txt (nvidia-smi, versions), tests.log, throughput.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/drgn_gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || { echo "wheel install failed: run scripts/gpu_wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
              'bf16', torch.cuda.is_bf16_supported())"; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

timeout "${TEST_SECONDS:-200}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  tests/test_train_accuracy.py tests/test_models.py 2>&1 | tee "$OUT/tests.log"

peer=()
[ -x /tmp/site/bin/cryodrgn ] && peer=(--cryodrgn /tmp/site/bin/cryodrgn)
timeout "${THROUGHPUT_SECONDS:-300}" python3 bench/train_throughput.py --device cuda --threads 8 \
  --D ${THROUGHPUT_D:-64 128 256} --arch 256x3 1024x3 --precision fp32 bf16 --epochs 2 \
  --seconds 8 --gflops 20000 --max-images 20000 --workdir /tmp/drgn_tp "${peer[@]}" \
  2>&1 | grep '^{"D"' | tee "$OUT/throughput.jsonl"
