"""Benchmark: `drgn downsample` throughput (images/s), D0=256 → D=128, float32 and float16 output.

Writes one stack of random 256×256 images (2,000 by default) with a canonical table, then times
`downsample_table` (the whole command minus Python start-up: read from the memory-mapped stack, sign,
Fourier crop, write) for each output dtype. Prints JSON.

With `--apix 1.24,1.25` the rows are split into consecutive optics groups of those pixel sizes (merged
sessions; `--interleave` alternates them row by row instead), so the per-group resampling is timed: the
1.25 Å group's 254-px window goes through the resampling matrix, the 1.24 Å group through the FFT crop.

Run: .venv/bin/python bench/downsample.py [--n 2000] [--D0 256] [--D 128] [--threads 2] [--workdir DIR]
         [--apix 1.24,1.25] [--interleave] [--repeat 1] [--kernel]
--kernel times only the in-memory resampling of 128 images per window size the plan uses (the FFT crop
of the whole box, or the window's FFT crop or matrix product), interleaved 30 times, best CPU time: on a
shared machine the end-to-end figures scatter by 2×, this much less.
The code measured is whichever drgn_core is on PYTHONPATH, so the same script times another version
(e.g. an exported older commit) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch


def make_table(root: Path, n: int, D0: int, seed: int = 0, apix: tuple[float, ...] = (1.0,),
               interleave: bool = False):
    """A stack of n random D0×D0 images and a canonical table over it, in len(apix) optics groups."""
    from drgn_core.io.table import ParticleTable, write_table

    rng = np.random.default_rng(seed)
    m = mrcfile.new_mmap(root / "orig.mrcs", shape=(n, D0, D0), mrc_mode=2, overwrite=True)
    for s in range(0, n, 250):
        m.data[s:s + 250] = rng.standard_normal((min(250, n - s), D0, D0), dtype=np.float32)
    m.set_image_stack()
    m.voxel_size = 1.0
    m.close()
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@orig.mrcs" for i in range(n)],
        "rlnAngleRot": 0.0, "rlnAngleTilt": 0.0, "rlnAnglePsi": 0.0, "rlnOriginXAngst": 0.0,
        "rlnOriginYAngst": 0.0, "rlnDefocusU": 1e4, "rlnDefocusV": 1e4, "rlnDefocusAngle": 0.0,
        "rlnPhaseShift": 0.0, "rlnOpticsGroup": _groups(n, len(apix), interleave),
        "drgnStackPath": str(root / "orig.mrcs"),
        "drgnStackIndex": np.arange(n), "drgnImageSign": 1, "drgnSourceRow": np.arange(n)})
    k = len(apix)
    optics = pd.DataFrame({"rlnOpticsGroupName": [f"og{g}" for g in range(1, k + 1)],
                           "rlnOpticsGroup": list(range(1, k + 1)), "rlnVoltage": [300.0] * k,
                           "rlnSphericalAberration": [2.7] * k, "rlnAmplitudeContrast": [0.1] * k,
                           "rlnImagePixelSize": list(apix), "rlnImageSize": [D0] * k,
                           "rlnImageDimensionality": [2] * k})
    table = ParticleTable(particles, optics)
    write_table(table, root / "table.star")
    return table


def kernel(table, D: int, batch: int = 128, rounds: int = 30) -> dict[str, float]:
    """Best CPU-time images/s of the resampling alone, per window of the table's plan."""
    from drgn_core.downsample import fourier_resize_real, plan_resampling

    torch.set_num_threads(1)
    plan = plan_resampling(table, D)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(
        (batch, plan.groups[0].D0, plan.groups[0].D0), dtype=np.float32))
    best = {g.window: np.inf for g in plan.groups}
    for _ in range(rounds):
        for w in best:
            c0 = time.process_time()
            fourier_resize_real(x, D, w)
            best[w] = min(best[w], time.process_time() - c0)
    return {f"window_{w}": round(batch / t, 1) for w, t in best.items()}


def _groups(n: int, k: int, interleave: bool) -> np.ndarray:
    """Optics group (1..k) of each row: consecutive blocks, or row by row."""
    if interleave:
        return np.arange(n) % k + 1
    return np.minimum(np.arange(n) * k // max(n, 1), k - 1) + 1


def main() -> None:
    from drgn_core.downsample import downsample_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--D0", type=int, default=256)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--apix", default="1.0", help="pixel size of each optics group, e.g. 1.24,1.25")
    ap.add_argument("--interleave", action="store_true", help="alternate the groups row by row")
    ap.add_argument("--repeat", type=int, default=1, help="time each dtype this often; report the best")
    ap.add_argument("--kernel", action="store_true", help="also time the in-memory resampling alone")
    args = ap.parse_args()
    apix = tuple(float(a) for a in args.apix.split(","))
    result = {"benchmark": "drgn downsample", "n": args.n, "D0": args.D0, "D": args.D,
              "threads": args.threads, "chunk": args.chunk, "apix": list(apix),
              "interleave": args.interleave, "repeat": args.repeat, "cpus": os.cpu_count(),
              "load_avg_1min": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        table = make_table(root, args.n, args.D0, apix=apix, interleave=args.interleave)
        for kind in ("float32", "float16"):
            best, best_cpu = np.inf, np.inf
            for r in range(args.repeat):
                t0, c0 = time.perf_counter(), time.process_time()
                downsample_table(table, args.D, root / f"p.{kind}.{r}.mrcs", chunk=args.chunk,
                                 float16=kind == "float16", max_threads=args.threads, progress=False)
                best = min(best, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            result[f"{kind}_images_per_s"] = round(args.n / best, 1)
            result[f"{kind}_s"] = round(best, 2)
            # Images per second of this process's CPU time: on a shared machine the wall clock mostly
            # measures the other jobs; with --threads 1 this is the figure to compare between versions.
            result[f"{kind}_images_per_cpu_s"] = round(args.n / best_cpu, 1)
        if len(apix) > 1:
            meta = json.loads((root / "p.float32.0.json").read_text())
            result["windows"] = [g["window"] for g in meta["groups"]]
            result["common_apix"] = meta["apix"]
    if args.kernel:
        result["kernel_images_per_cpu_s"] = kernel(table, args.D)
    result["torch"] = torch.__version__
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
