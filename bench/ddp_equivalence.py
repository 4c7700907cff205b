"""One process against N data-parallel processes (`drgn train --nproc N`, gloo on the CPU or NCCL on
GPUs) with the same global batch, as JSON: per-step loss differences, weight differences, wall times.

    .venv/bin/python bench/ddp_equivalence.py --nproc 2 --batch 64 --epochs 2

Data: the CI-size continuous set (tests/conftest_train.py, 3,000 images, D = 32), fp32, 64x2 networks.
Two processes sum the gradients of two half-batches where one process takes the gradient of the whole
batch; the results differ in the last bits and training amplifies that step by step, so the report gives
the largest difference and the first step at which it exceeds 1e-5 (None: never).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from conftest_train import render

    out = args.out or Path(tempfile.mkdtemp(prefix="drgn-ddp-"))
    ds = render(out / "data", n=3000, D=32, kind="continuous", snr=1.0, apix=5.0, seed=0)
    opts = ["--zdim", "1", "--enc-dim", "64", "--enc-layers", "2", "--dec-dim", "64", "--dec-layers", "2",
            "--threads", "1", "--device", args.device, "--precision", "fp32", "--epochs", str(args.epochs),
            "--batch-size", str(args.batch), "--lr", str(args.lr), "--val-frac", "0.1", "--log-steps"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res: dict = {"nproc": args.nproc, "global_batch": args.batch, "epochs": args.epochs, "lr": args.lr}
    runs = {}
    for name, extra in (("single", []), ("ddp", ["--nproc", str(args.nproc)])):
        runs[name] = out / name
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "drgn_core.cli", "train", str(ds.table), str(ds.stack), "-o",
               str(runs[name]), *opts, *extra]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name} failed:\n{r.stderr[-2000:]}")
        res[f"{name}_wall_s"] = round(time.perf_counter() - t0, 1)
    s, d = (np.genfromtxt(runs[k] / "train_steps.csv", delimiter=",", names=True) for k in ("single", "ddp"))
    diff = np.abs(s["loss"] - d["loss"])
    over = np.flatnonzero(diff > 1e-5)
    ws, wd = (torch.load(runs[k] / "model.pt", weights_only=True)["state_dict"] for k in ("single", "ddp"))
    zs, zd = (np.load(runs[k] / "z.npy") for k in ("single", "ddp"))
    res.update({"steps": len(s), "max_abs_step_loss_diff": float(diff.max()),
                "first_step_over_1e-5": int(over[0]) + 1 if len(over) else None,
                "max_abs_weight_diff": max(float((ws[k] - wd[k]).abs().max()) for k in ws),
                "max_abs_weight": max(float(ws[k].abs().max()) for k in ws),
                "max_abs_z_diff": float(np.abs(zs - zd).max())})
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
