"""Learning-rate schedule, batch scaling and training subset against the default, as JSON.

For one simulated set with ground truth, trains each variant (a name and its extra `drgn train` flags) in
this process with the same base flags and seed, and reports per variant: the accuracy of the final latent
(|Spearman ρ| for a continuous set, ARI of k-means for a compositional one, docs/architecture.md § Metrics
on simulated data), for a --train-subset run also on the rows trained on (held in) and the others (held
out) separately, the CPU seconds of the whole `drgn train` (this process's user + system time: robust to
other load on a shared machine, unlike wall time) and the wall seconds.

Sets:
  ci-continuous     the CI continuous set of tests/test_train_accuracy.py: 3,000 hinge images, D 32, SNR 1
  ci-compositional  its compositional set: 3,000 images, D 32, SNR 0.5, 3 states
  hinge64           drgnflow's simulator: continuous uniform hinge, D 64, SNR 0.1, --n images

    .venv/bin/python bench/lr_levers.py --set ci-continuous --workdir /tmp/levers --epochs 12 \\
        --variant base= --variant sub1500="--train-subset 1500" \\
        --variant cos="--lr-schedule cosine --warmup-epochs 1 --lr-final 0.1" \\
        -- --zdim 1 --enc-dim 128 --enc-layers 2 --dec-dim 128 --dec-layers 2 --lr 1e-3 --threads 1 \\
        --val-frac 0

A variant whose run directory already holds model.pt is not trained again (its CPU time is then absent).
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_set(name: str, work: Path, n: int, seed: int) -> tuple[Path, Path]:
    """(table, stack) of the named set, written under `work` once."""
    data = work / f"data_{name}_{n}_{seed}"
    if name.startswith("ci-"):
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest_train import render

        if name == "ci-continuous":
            ds = render(data, n=n, D=32, kind="continuous", snr=1.0, apix=5.0, seed=seed)
        else:
            ds = render(data, n=n, D=32, kind="compositional", snr=0.5, apix=5.0, seed=seed + 12,
                        phantom="fixed")
        return ds.table, ds.stack
    from drgn_core.simulate import SimConfig, run_simulation

    if not (data / "table.star").exists():
        run_simulation(SimConfig(n=n, D=64, snr=0.1, heterogeneity="continuous", seed=seed), data,
                       progress=False)
    return data / "table.star", data / "particles.mrcs"


def accuracy(run: Path, table: Path) -> dict:
    """The final latent against the truth: all rows, and held-in / held-out rows of a subset run."""
    from drgn_core.evaluate import cluster_metric, spearman_metric
    from drgn_core.io.table import read_table

    t = read_table(table).particles
    z = np.load(run / "z.npy", allow_pickle=False)
    rows = np.load(run / "indices.npy", allow_pickle=False)
    groups = {"all": np.ones(len(rows), bool)}
    if (run / "train_indices.npy").exists():
        held_in = np.isin(rows, np.load(run / "train_indices.npy", allow_pickle=False))
        groups.update(held_in=held_in, held_out=~held_in)
    out = {}
    for g, use in groups.items():
        if "drgnGtCoord" in t and np.isfinite(t["drgnGtCoord"].to_numpy(float)).any():
            coord = t["drgnGtCoord"].to_numpy(float)[rows]
            out[f"rho_{g}"] = round(spearman_metric(z[use], coord[use])["value"], 4)
        else:
            states = t["drgnGtState"].to_numpy()[rows]
            out[f"ari_{g}"] = round(cluster_metric(z[use], states[use])["ari"], 4)
    return out


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="ci-continuous",
                    choices=["ci-continuous", "ci-compositional", "hinge64"])
    ap.add_argument("--n", type=int, default=3000, help="images in the set (default 3000)")
    ap.add_argument("--seed", type=int, default=0, help="the data's seed (training seed: in the flags)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=FLAGS: extra drgn train flags of one variant (NAME= for the base alone)")
    ap.add_argument("train_flags", nargs="*", help="after --: drgn train flags shared by every variant")
    a = ap.parse_args()
    from drgn_core.cli import main as drgn

    a.workdir.mkdir(parents=True, exist_ok=True)
    table, stack = make_set(a.set, a.workdir, a.n, a.seed)
    results = {}
    for spec in a.variant or ["base="]:
        name, _, flags = spec.partition("=")
        run = a.workdir / f"{a.set}_{a.n}_{name}"
        entry: dict = {"flags": flags}
        if not (run / "model.pt").exists():
            c0, t0 = cpu_seconds(), time.perf_counter()
            rc = drgn(["train", str(table), str(stack), "-o", str(run), "--epochs", str(a.epochs),
                       *a.train_flags, *shlex.split(flags)])
            if rc != 0:
                entry["error"] = f"drgn train exited {rc}"
                results[name] = entry
                continue
            entry.update(cpu_s=round(cpu_seconds() - c0, 1), wall_s=round(time.perf_counter() - t0, 1))
        entry.update(accuracy(run, table))
        results[name] = entry
        print(json.dumps({name: entry}), file=sys.stderr, flush=True)
    print(json.dumps({"set": a.set, "n": a.n, "epochs": a.epochs, "base_flags": a.train_flags,
                      "variants": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
