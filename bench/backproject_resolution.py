"""Benchmark: resolution and speed of `drgn backproject` on a simulated homogeneous data set.

Simulates particles of one procedural pseudo-atomic model (`drgn_core.simulate`, heterogeneity "none",
white noise at the given SNR, CTF with B-factor envelope, random shifts), back-projects them at their
true poses, and compares:

- the gold-standard FSC between the half maps (unmasked and with the paper's mask): 0.143 crossing;
- the FSC of the full map against the ground-truth volume: 0.5 and 0.143 crossings — the half-map 0.143
  criterion should land near the full map's 0.5 crossing against the truth;
- back-projection throughput (images/s, wall clock and CPU time).

Prints one JSON object per configuration (and a list at the end).
Run: .venv/bin/python bench/backproject_resolution.py [--n 20000] [-D 64] [--snr 0.1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def run_one(n: int, D: int, apix: float, snr: float, seed: int, workdir: Path, threads: int) -> dict:
    import torch

    from drgn_core.backproject import backproject_table
    from drgn_core.fsc import crossing, fsc_curve
    from drgn_core.io.mrc import read_mrc
    from drgn_core.io.table import read_table
    from drgn_core.simulate import SimConfig, run_simulation

    torch.set_num_threads(threads)
    out = workdir / f"sim_n{n}_D{D}_snr{snr}"
    t0 = time.perf_counter()
    run_simulation(SimConfig(n=n, D=D, apix=apix, snr=snr, heterogeneity="none", seed=seed), out,
                   progress=False)
    t_sim = time.perf_counter() - t0

    table = read_table(out / "table.star")
    gt, _ = read_mrc(out / "gt_volumes" / "vol_000.mrc", mmap=False)
    t0, c0 = time.perf_counter(), time.process_time()
    rec = backproject_table(table, None, None, seed=seed, progress=False)
    t_bp, c_bp = time.perf_counter() - t0, time.process_time() - c0

    freq, fsc_gt = fsc_curve(rec.map, gt)
    _, fsc_half_gt = fsc_curve(rec.half1, gt)
    a, b = rec.map - rec.map.mean(), gt - gt.mean()
    return {
        "n": n, "D": D, "apix": apix, "snr": snr, "seed": seed, "threads": threads,
        "nyquist_A": 2 * apix,
        "gsfsc_0.143_A": crossing(rec.freq, rec.fsc, 0.143, apix),
        "gsfsc_masked_0.143_A": crossing(rec.freq, rec.fsc_masked, 0.143, apix),
        "map_vs_gt_0.5_A": crossing(freq, fsc_gt, 0.5, apix),
        "map_vs_gt_0.143_A": crossing(freq, fsc_gt, 0.143, apix),
        "half_map_vs_gt_0.5_A": crossing(freq, fsc_half_gt, 0.5, apix),
        "map_vs_gt_correlation": float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())),
        "split": rec.split,
        "simulate_s": round(t_sim, 2),
        "backproject_wall_s": round(t_bp, 2),
        "backproject_cpu_s": round(c_bp, 2),
        "images_per_s_wall": round(n / t_bp, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[5000, 20000], help="particle counts")
    ap.add_argument("-D", type=int, nargs="+", default=[64], help="box sizes")
    ap.add_argument("--apix", type=float, default=3.0)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", help="where the simulated data go (default: a temporary folder)")
    args = ap.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        for D in args.D:
            for n in args.n:
                r = run_one(n, D, args.apix, args.snr, args.seed, work, args.threads)
                print(json.dumps(r), flush=True)
                results.append(r)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
