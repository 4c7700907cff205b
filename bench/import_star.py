"""Benchmark: `drgn import` of a 1,000,000-row RELION 3.1 STAR with 4 optics groups (target ≤ 30 s), with
peak memory; and our STAR reader/writer (drgn_core.io.star_format) against the `starfile` package.

Writes 10 small stacks (100,000 images of 8×8 each, sparse files) and a synthetic STAR referencing them,
then runs `drgn import` in a child process and reports its wall time and peak RSS as JSON. With
--compare-parsers it also times, on the same file, `read_star_blocks` vs `starfile.read` and
`write_star` vs `starfile.write` (best of --repeat runs each), which decides which one drgnflow uses.

Run: .venv/bin/python bench/import_star.py [--n 1000000] [--stacks 10] [--compare-parsers] [--workdir DIR]
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
        "rlnPhaseShift": np.zeros(n), "rlnOpticsGroup": 1 + (rows % 4), "rlnRandomSubset": 1 + rows % 2,
        "rlnClassNumber": np.ones(n, dtype=int), "rlnMicrographName": "Movies/mic_" + pd.Series(rows // 300)
        .astype(str) + ".mrc",
    })
    optics = pd.DataFrame({"rlnOpticsGroupName": ["og1", "og2", "og3", "og4"], "rlnOpticsGroup": [1, 2, 3, 4],
                           "rlnVoltage": [300.0, 200.0, 300.0, 300.0],
                           "rlnSphericalAberration": [2.7, 1.4, 2.7, 2.7],
                           "rlnAmplitudeContrast": [0.1, 0.07, 0.1, 0.1], "rlnImagePixelSize": [1.5] * 4,
                           "rlnImageSize": [D] * 4, "rlnImageDimensionality": [2] * 4})
    star = root / "particles.star"
    write_star({"optics": optics, "particles": particles}, star)
    return star


def compare_parsers(star: Path, workdir: Path, repeat: int) -> dict:
    """Best-of-`repeat` seconds: our reader/writer and starfile's, on the same STAR."""
    import starfile

    from drgn_core.io.star_format import read_star_blocks, write_star

    def best(fn) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(min(times), 2)

    ours = read_star_blocks(star)
    theirs = starfile.read(star, always_dict=True)
    same = (len(ours["particles"]) == len(theirs["particles"])
            and np.allclose(ours["particles"]["rlnDefocusU"], theirs["particles"]["rlnDefocusU"])
            and ours["particles"]["rlnImageName"].tolist()[:1000]
            == theirs["particles"]["rlnImageName"].astype(str).tolist()[:1000])
    blocks = {"optics": ours["optics"], "particles": ours["particles"]}
    return {
        "read_ours_s": best(lambda: read_star_blocks(star)),
        "read_starfile_s": best(lambda: starfile.read(star, always_dict=True)),
        "write_ours_s": best(lambda: write_star(blocks, workdir / "ours.star")),
        "write_starfile_s": best(lambda: starfile.write(blocks, workdir / "theirs.star", overwrite=True)),
        "same_values": bool(same), "repeat": repeat,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--stacks", type=int, default=10)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--compare-parsers", action="store_true", help="also time our STAR reader/writer "
                    "against the starfile package on the same file")
    ap.add_argument("--repeat", type=int, default=2, help="runs per parser timing (best is reported)")
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
        result = {
            "benchmark": "drgn import, RELION 3.1 STAR, 4 optics groups",
            "particles": args.n, "stacks": args.stacks, "star_MB": round(star.stat().st_size / 1e6, 1),
            "table_MB": round(out.stat().st_size / 1e6, 1), "import_s": round(wall, 2),
            "peak_rss_MB": round(peak_kib / 1024, 1), "target_s": 30, "setup_s": round(t_make, 1),
        }
        if args.compare_parsers:
            result["parsers"] = compare_parsers(star, root, args.repeat)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
