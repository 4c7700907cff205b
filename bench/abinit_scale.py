"""drgn abinit speed and memory: images/s of the pose search (soft and hard rounds) and of the refinement,
peak memory, and how they grow with the box D and the number of particles N. Prints JSON.

Each case simulates a homogeneous set (SNR 0.1), runs one soft round, one hard round and one refinement
epoch on it, and reports per-phase images/s (wall) and images per CPU second (process time of all
threads: the figure to compare on a shared machine), and the process's peak RSS. Accuracy against the
truth and against training on the true poses is bench/abinit_accuracy.py's.

    python bench/abinit_scale.py --cases 32:500,64:500,64:1000 --threads 2
    python bench/abinit_scale.py --cases 64:4000 --threads 2 --full   # the 1 h target: a whole default run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_case(D: int, n: int, workdir: Path, full: bool, seed: int) -> dict:
    from drgn_core.abinit.rounds import search_rounds
    from drgn_core.abinit.search import SearchConfig
    from drgn_core.data import open_particles, read_rows
    from drgn_core.io.table import read_table
    from drgn_core.simulate import SimConfig, run_simulation

    sim = workdir / f"sim_{D}_{n}"
    run_simulation(SimConfig(n=n, D=D, snr=0.1, heterogeneity="none", seed=seed), sim, progress=False)
    table = read_table(sim / "table.star")
    src = open_particles(sim / "particles.mrcs", table)
    rows = np.arange(n)
    ctf = table.ctf_params(src.apix)

    def read(pos: np.ndarray) -> np.ndarray:
        return read_rows(src, rows[pos])

    out: dict = {"D": D, "n": n}
    if full:
        from drgn_core.abinit.run import abinit

        t0 = time.perf_counter()
        run = abinit(sim / "table.star", sim / "particles.mrcs", workdir / f"run_{D}_{n}", {"zdim": 0},
                     seed=seed, progress=False)
        out["total_s"] = time.perf_counter() - t0
        out["run"] = str(run)
        out["peak_rss_MiB"] = peak_rss_mib()
        return out
    # one soft round (minibatch = all, to time every image), then one hard round
    for kind, cfg in (("soft", SearchConfig(iterations=1, soft_iterations=1, minibatch=0)),
                      ("hard", SearchConfig(iterations=1, soft_iterations=0))):
        run = workdir / f"{kind}_{D}_{n}"
        t0, c0 = time.perf_counter(), time.process_time()
        res, _ = search_rounds(read, n, D, src.apix, ctf, cfg.resolved(D), seed, run, torch.device("cpu"),
                               progress=False, log=lambda m: None)
        secs = time.perf_counter() - t0
        out[f"{kind}_round_s"] = secs
        out[f"{kind}_round_cpu_s"] = time.process_time() - c0   # all threads: robust to a shared machine
        out[f"{kind}_images_per_s"] = n / secs
        out[f"{kind}_images_per_cpu_s"] = n / out[f"{kind}_round_cpu_s"]
        out[f"{kind}_L"] = cfg.resolved(D).radius(0)
    out["peak_rss_MiB_search"] = peak_rss_mib()
    # one refinement epoch at the searched poses
    from drgn_core.abinit.refine import RefineConfig, refine
    from drgn_core.abinit.run import with_poses
    from drgn_core.data import ParticleData
    from drgn_core.models import HalfLattice, HetVAE, ModelConfig

    lattice = HalfLattice(D)
    searched = with_poses(table, rows, res["poses"], res["shifts"] * src.apix)
    data = ParticleData(src, searched, rows, lattice, 1.0, torch.device("cpu"), "memory", 0, False)
    model = HetVAE(ModelConfig(D=D, zdim=0))
    t0, c0 = time.perf_counter(), time.process_time()
    refine(model, data, RefineConfig(epochs=1, pose_start=0), seed, workdir / f"refine_{D}_{n}.pt", False,
           lambda m: None)
    secs = time.perf_counter() - t0
    out["refine_images_per_s"] = n / secs
    out["refine_images_per_cpu_s"] = n / (time.process_time() - c0)
    out["peak_rss_MiB"] = peak_rss_mib()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="32:500,64:500", help="D:N pairs (default 32:500,64:500)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full", action="store_true", help="time a whole default drgn abinit run per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the data and runs here (default: a temporary folder)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = [one_case(D, n, work, args.full, args.seed) for D, n in cases]
    print(json.dumps({"threads": args.threads, "load_average": os.getloadavg(),
                      "torch": torch.__version__, "cases": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
