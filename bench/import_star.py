"""Benchmark: `drgn import` of a 1,000,000-row RELION 3.1 STAR (target ≤ 30 s), with peak memory.

Writes 10 small stacks (100,000 images of 8×8 each, sparse files) and a synthetic STAR referencing them,
then runs `drgn import` in a child process and reports its wall time and peak RSS as JSON.

Run: .venv/bin/python bench/import_star.py [--n 1000000] [--stacks 10] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd


def make_dataset(root: Path, n: int, n_stacks: int, D: int = 8, seed: int = 0) -> Path:
    """Stacks s000.mrcs … and particles.star (RELION 3.1) with random poses/CTF over them."""
    from drgn_core.io.star_format import write_star

    rng = np.random.default_rng(seed)
    per = -(-n // n_stacks)
    (root / "stacks").mkdir(parents=True, exist_ok=True)
    for k in range(n_stacks):
        m = mrcfile.new_mmap(root / "stacks" / f"s{k:03d}.mrcs", shape=(per, D, D), mrc_mode=2,
                             overwrite=True)
        m.set_image_stack()
        m.voxel_size = 1.5
        m.close()
    rows = np.arange(n)
    names = (pd.Series(rows % per + 1).astype(str).str.zfill(6) + "@stacks/s"
             + pd.Series(rows // per).astype(str).str.zfill(3) + ".mrcs")
    particles = pd.DataFrame({
        "rlnImageName": names, "rlnAngleRot": rng.uniform(-180, 180, n),
        "rlnAngleTilt": rng.uniform(0, 180, n), "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.normal(0, 3, n),
        "rlnOriginYAngst": rng.normal(0, 3, n), "rlnDefocusU": rng.uniform(8e3, 3e4, n),
        "rlnDefocusV": rng.uniform(8e3, 3e4, n), "rlnDefocusAngle": rng.uniform(0, 180, n),
        "rlnPhaseShift": np.zeros(n), "rlnOpticsGroup": 1 + (rows % 2), "rlnRandomSubset": 1 + rows % 2,
        "rlnClassNumber": np.ones(n, dtype=int), "rlnMicrographName": "Movies/mic_" + pd.Series(rows // 300)
        .astype(str) + ".mrc",
    })
    optics = pd.DataFrame({"rlnOpticsGroupName": ["og1", "og2"], "rlnOpticsGroup": [1, 2],
                           "rlnVoltage": [300.0, 200.0], "rlnSphericalAberration": [2.7, 1.4],
                           "rlnAmplitudeContrast": [0.1, 0.07], "rlnImagePixelSize": [1.5, 1.5],
                           "rlnImageSize": [D, D], "rlnImageDimensionality": [2, 2]})
    star = root / "particles.star"
    write_star({"optics": optics, "particles": particles}, star)
    return star


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--stacks", type=int, default=10)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        star = make_dataset(root, args.n, args.stacks)
        t_make = time.perf_counter() - t0
        out = root / "table.star"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "drgn_core.cli", "import", str(star), "-o", str(out)],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"drgn import failed: {proc.stderr}")
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(json.dumps({
            "benchmark": "drgn import, RELION 3.1 STAR",
            "particles": args.n, "stacks": args.stacks, "star_MB": round(star.stat().st_size / 1e6, 1),
            "table_MB": round(out.stat().st_size / 1e6, 1), "import_s": round(wall, 2),
            "peak_rss_MB": round(peak_kib / 1024, 1), "target_s": 30, "setup_s": round(t_make, 1),
        }, indent=1))


if __name__ == "__main__":
    main()
