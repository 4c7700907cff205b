"""Cost of the contact sheet every map series gets (drgn_core.plots.volume_sheet): seconds and PNG size.

The sheet is drawn beside every series that `drgn analyze`, `drgn traverse` and `drgn volumes` write, so
its time is added to theirs; this prints it for a full sheet (20 maps, the most a sheet shows) at the box
sizes people decode, next to the time to write the same maps as .mrc files.

    python bench/volume_sheet.py --sizes 64 128 256 --maps 20
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from drgn_core import plots
from drgn_core.io.mrc import write_mrc


def _blobs(D: int, rng: np.random.Generator, n: int = 12) -> np.ndarray:
    """A map-like volume: a dozen Gaussian blobs near the centre plus 5 % noise (pure noise would make
    the PNG incompressible and overstate its size; real maps compress like this)."""
    x = np.arange(D, dtype=np.float32) - D / 2
    vol = np.zeros((D, D, D), np.float32)
    for c in rng.normal(scale=D / 10, size=(n, 3)):
        g = [np.exp(-((x - ci) ** 2) / (2 * (D / 20) ** 2)) for ci in c]
        vol += g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
    return vol + rng.normal(scale=0.05, size=vol.shape).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="box sizes D")
    p.add_argument("--maps", type=int, default=20, help="maps per series")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for D in args.sizes:
            vols = np.stack([_blobs(D, rng) for _ in range(args.maps)])
            t0 = time.perf_counter()
            for i, v in enumerate(vols):
                write_mrc(Path(tmp) / f"vol_{i:03d}.mrc", v, 1.0)
            t_mrc = time.perf_counter() - t0
            t0 = time.perf_counter()
            sheet = plots.volume_sheet(vols, Path(tmp) / "maps.png", title=f"D = {D}")
            t_sheet = time.perf_counter() - t0
            rows.append({"D": D, "maps": args.maps, "sheet_s": round(t_sheet, 2),
                         "mrc_write_s": round(t_mrc, 2), "panel_px": sheet.panel,
                         "png_kB": round(sheet.path.stat().st_size / 1024, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"volume_sheet": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
