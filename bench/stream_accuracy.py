"""Does streaming cost accuracy? |Spearman ρ| of the latent against the hinge coordinate on the CI-size
continuous set (tests/test_train_accuracy.py: 3,000 images, D = 32, zdim 1, 128x2 networks, 12 epochs),
trained with the prepared images in memory and streamed in chunks, as JSON.

    .venv/bin/python bench/stream_accuracy.py --order sorted --chunk 100 --mix 4

`--order sorted` writes the stack ordered by the ground-truth coordinate: the worst case for chunked
shuffling (a chunk then holds one narrow range of conformations, as a stack ordered by micrograph holds
one micrograph's particles), where batches drawn from single chunks would be far from random. `--order
random` keeps the rendered (random) order. `--mix 1` shows chunk-at-a-time shuffling for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--zdim", "1", "--enc-dim", "128", "--enc-layers", "2", "--dec-dim", "128", "--dec-layers", "2",
         "--lr", "1e-3", "--threads", "1", "--val-frac", "0", "--seed", "0", "--device", "cpu"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--order", choices=["sorted", "random"], default="sorted")
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--mix", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--modes", nargs="+", default=["memory", "stream"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest_train import render
    from scipy.stats import spearmanr

    from drgn_core.io.mrc import read_mrc, write_mrc
    from drgn_core.io.table import read_table, write_table

    out = args.out or Path(tempfile.mkdtemp(prefix="drgn-stream-acc-"))
    ds = render(out / "data", n=3000, D=32, kind="continuous", snr=1.0, apix=5.0, seed=0)
    table, stack, gt = ds.table, ds.stack, np.asarray(ds.gt_coord)
    if args.order == "sorted":
        perm = np.argsort(gt, kind="stable")
        images, apix = read_mrc(ds.stack, mmap=False)
        stack, table = out / "sorted.mrcs", out / "sorted.star"
        write_mrc(stack, images[perm], apix, stack=True)
        write_table(read_table(ds.table).subset(perm), table)
        gt = gt[perm]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = {"order": args.order, "chunk": args.chunk, "mix": args.mix, "epochs": args.epochs}
    for mode in args.modes:
        run = out / f"run_{mode}"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "drgn_core.cli", "train", str(table), str(stack), "-o",
                            str(run), *SMALL, "--epochs", str(args.epochs), "--data-mode", mode, "--chunk",
                            str(args.chunk), "--mix-chunks", str(args.mix)], env=env, capture_output=True,
                           text=True)
        if r.returncode != 0:
            result[mode] = {"error": r.stderr[-1500:]}
            continue
        z = np.load(run / "z.npy")[:, 0]
        result[mode] = {"abs_spearman_rho": round(abs(float(spearmanr(z, gt).statistic)), 4),
                        "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
