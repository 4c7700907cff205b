"""`--epochs auto` against fixed runs: does the stopping rule stop early without losing accuracy?

For a simulated set with a ground-truth reaction coordinate (a table with drgnGtCoord):
1. a fixed run of --epochs N with --encode-every 1 (snapshots every epoch), or an existing such run;
2. |Spearman ρ| of every epoch's latent against the truth (drgn_core.evaluate.spearman_metric), and
   `drgn convergence` on the snapshots;
3. the epoch `needed`: the first whose ρ is within 0.01 of the final one (and stays so), against the epoch
   after which `--epochs auto` stops (the rule applied to the same snapshots: the trajectory of an auto run
   with the same seed is this run's up to the stop, see tests/test_convergence.py).

Prints one JSON object. Example (the CI-size continuous set of tests/test_train_accuracy.py):

    python bench/epochs_auto.py --ci-set /tmp/ci --epochs 20 -- --zdim 1 --enc-dim 128 --enc-layers 2 \\
        --dec-dim 128 --dec-layers 2 --lr 1e-3 --threads 1 --val-frac 0
    python bench/epochs_auto.py --run results/highres --table results/data/table.star
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def rho_per_epoch(run: Path, table: Path) -> dict[int, float]:
    """|Spearman ρ| of each snapshot's latent (rows of indices.npy) against drgnGtCoord."""
    from drgn_core.convergence import list_snapshots
    from drgn_core.evaluate import spearman_metric
    from drgn_core.io.indices import read_index_file
    from drgn_core.io.table import read_table

    t = read_table(table)
    coord = t.particles["drgnGtCoord"].to_numpy(dtype=np.float64)
    junk = t.particles["drgnGtJunk"].to_numpy(dtype=float) > 0 if "drgnGtJunk" in t.particles else None
    rows = read_index_file(run / "indices.npy")
    out = {}
    for s in list_snapshots(run):
        z = np.load(s.z, allow_pickle=False).reshape(len(rows), -1)
        out[s.epoch] = spearman_metric(z, coord[rows], None if junk is None else junk[rows])["value"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="an existing run trained with --encode-every 1")
    ap.add_argument("--table", type=Path, help="its table with drgnGtCoord")
    ap.add_argument("--ci-set", type=Path, help="render the CI continuous set here and train on it")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("train_flags", nargs="*", help="after --: more drgn train flags")
    a = ap.parse_args()
    from drgn_core.cli import main as drgn
    from drgn_core.convergence import convergence

    t0 = time.perf_counter()
    if a.ci_set:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest_train import render

        ds = render(a.ci_set / "data", n=3000, D=32, kind="continuous", snr=1.0, apix=5.0, seed=0)
        a.table, a.run = ds.table, a.ci_set / f"fixed{a.epochs}"
        if not (a.run / "model.pt").exists():
            assert drgn(["train", str(ds.table), str(ds.stack), "-o", str(a.run), "--epochs", str(a.epochs),
                         "--encode-every", "1", *a.train_flags]) == 0
    train_s = time.perf_counter() - t0
    conv = convergence(a.run, a.run / "convergence", progress=False)
    rho = rho_per_epoch(a.run, a.table)
    final = rho[max(rho)]
    eps = sorted(rho)
    needed = next(e for e in eps if all(rho[f] >= final - 0.01 for f in eps if f >= e))
    stop = conv["auto_would_stop_after"]
    print(json.dumps({"run": str(a.run), "rho_per_epoch": {str(k): round(v, 4) for k, v in rho.items()},
                      "final_epoch": max(rho), "final_rho": round(final, 4), "epochs_needed": needed,
                      "auto_stops_after": stop,
                      "rho_at_auto_stop": None if stop is None else round(rho[stop], 4),
                      "pairs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in p.items()
                                 if k != "map_agreement_per_point"} for p in conv["pairs"]],
                      "train_seconds": round(train_s, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
