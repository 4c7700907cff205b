"""CPU-seconds of `drgn analyze`'s UMAP at demo size (2,550 latents, 10-D), in a fresh process.

Usage: NUMBA_CACHE_DIR=/tmp/numba-cold python bench/umap_cost.py [--neighbours exact|umap-learn]
Prints JSON: the neighbour path, the CPU-seconds of the import and of run_umap. Run it twice with the same
NUMBA_CACHE_DIR (empty first) to see the cold (first demo) and the warm (cached JIT) cost.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--neighbours", choices=["exact", "umap-learn"], default="exact")
    ap.add_argument("--n", type=int, default=2550)
    args = ap.parse_args()
    t0 = time.process_time()
    from drgn_core import analysis
    if args.neighbours == "umap-learn":  # the path before exact_knn: umap-learn's own pairwise distances
        analysis.UMAP_EXACT_KNN = 0
    t1 = time.process_time()
    z = np.random.default_rng(0).normal(size=(args.n, 10)).astype(np.float32)
    res = analysis.run_umap(z, seed=0)
    t2 = time.process_time()
    print(json.dumps({"n": args.n, "neighbours": res.info["neighbours"], "import_cpu_s": round(t1 - t0, 2),
                      "umap_cpu_s": round(t2 - t1, 2)}))


if __name__ == "__main__":
    main()
