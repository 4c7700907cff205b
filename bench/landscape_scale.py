"""Landscape analysis at scale: time per stage and peak memory of `drgn landscape`, printed as JSON.

The target (issue 19): 1000 maps at 64³ from the demo's high-res model, masked, PCA and clustering, in
≤ 5 min on 2 CPU cores, with memory bounded by a chunk of maps (never all maps at full size). Each
configuration runs in a fresh child process, so its peak RSS (ru_maxrss) is its own; comparing the peak
across map counts shows whether memory grows with the number of maps.

  python bench/landscape_scale.py --run results/highres/train                         # 1000 maps at 64³
  python bench/landscape_scale.py --run results/highres/train --maps 250 500 1000 -D 64
  python bench/landscape_scale.py --run results/highres/train --maps 250 -D 32 48 64  # scaling with box

Writes each landscape into a temporary folder (removed afterwards) and prints one JSON document: per
configuration the seconds of each stage (k-means, decode + mask, PCA, states, regressor, plots), the
total, the peak RSS and the size of one chunk of maps, plus the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def child(run: str, n_maps: int, D: int, chunk: int, device: str, threads: int) -> dict:
    """One landscape in this process → its timings and this process's peak RSS."""
    import torch

    from drgn_core.landscape import LandscapeOptions, landscape

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        s = landscape(run, Path(tmp) / "landscape", LandscapeOptions(n_maps=n_maps, D=D, chunk=chunk,
                                                                     device=device))
    return {"maps": s["n_maps"], "D": D, "chunk": chunk, "device": s["device"], "seconds": s["seconds"],
            "mask_voxels": s["mask"]["n_voxels"], "n_pcs": s["vol_pca"]["n_pcs"],
            "states": s["states"]["counts"], "r2_pc1": (s["regressor"]["r2_per_pc"] or [None])[0],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "chunk_of_maps_mb": round(chunk * D**3 * 4 / 2**20, 1),
            "all_maps_mb": round(s["n_maps"] * D**3 * 4 / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="results/highres/train", help="a drgn train run (the demo's high-res)")
    ap.add_argument("--maps", type=int, nargs="+", default=[1000])
    ap.add_argument("-D", type=int, nargs="+", default=[64], dest="D")
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.run, args.maps[0], args.D[0], args.chunk, args.device, args.threads)))
        return
    results = []
    for D in args.D:
        for m in args.maps:
            cmd = [sys.executable, __file__, "--child", "--run", args.run, "--maps", str(m), "-D", str(D),
                   "--chunk", str(args.chunk), "--device", args.device, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"})
            if out.returncode:
                sys.exit(f"landscape failed for {m} maps at D = {D}:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"run": args.run, "threads": args.threads, "cpus": os.cpu_count(),
                      "load_average": [round(x, 2) for x in os.getloadavg()], "results": results}, indent=1))


if __name__ == "__main__":
    main()
