"""How often the pose search from scratch converges: the same set searched with several seeds and soft-round
minibatch sizes. Prints JSON, one row per (minibatch, seed).

At low SNR a soft round's reference comes from a few hundred noisy images, so whether the search finds the
particle or settles on a wrong map depends on the draw. Each row runs the soft rounds and one hard round
over every image (`search_rounds`, the defaults of drgn abinit but keep 4 and L_max 20, the settings the
D 64 runs of bench/README.md used) and reports the median rotation error after the best global rotation
and hand, the last soft round's GSFSC and the hard round's median confidence (low in failed runs).

    python bench/abinit_accuracy.py --kind continuous --n 4000 --D 64 --snr 0.1 --zdim 1 --epochs 8 \\
      --sim-seed 1 --workdir /tmp/d64_4000 ...          # or any drgn simulate folder
    python bench/abinit_search_seeds.py --sim /tmp/d64_4000/sim_continuous_64_4000_0.1_1 \\
      --minibatch 200,600 --seeds 0,1,2,3 --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sim", required=True, help="drgn simulate folder (table.star, particles.mrcs)")
    p.add_argument("--minibatch", default="200", help="comma-separated soft-round minibatch sizes")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated search seeds")
    p.add_argument("--soft", type=int, default=15, help="soft rounds (default 15, drgn abinit's)")
    p.add_argument("--L-max", dest="L_max", type=int, default=20)
    p.add_argument("--starts", default="1",
                   help="comma-separated numbers of starts (drgn abinit --starts); with more than one, each "
                        "start's error on its last soft minibatch and the probe's scores are reported too")
    p.add_argument("--probe", type=int, default=500, help="probe images of --starts (default 500)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    from drgn_core.abinit.compare import pose_errors
    from drgn_core.abinit.rounds import search_rounds
    from drgn_core.abinit.search import SearchConfig
    from drgn_core.data import open_particles, read_rows
    from drgn_core.io.table import read_table

    torch.set_num_threads(args.threads)
    sim = Path(args.sim)
    table = read_table(sim / "table.star")
    src = open_particles(sim / "particles.mrcs", table)
    n, apix = len(table), src.apix
    rows = []
    ints = [[int(x) for x in v.split(",")] for v in (args.minibatch, args.starts, args.seeds)]
    for mb, starts, seed in itertools.product(*ints):
        cfg = SearchConfig(iterations=args.soft + 1, soft_iterations=args.soft, minibatch=mb, keep=4,
                           L_max=args.L_max, starts=starts, probe=args.probe).resolved(src.D)
        lines: list[str] = []
        t0, c0 = time.perf_counter(), time.process_time()
        with tempfile.TemporaryDirectory() as tmp:
            res, _ = search_rounds(lambda pos: read_rows(src, pos), n, src.D, apix,
                                   table.ctf_params(apix), cfg, seed, Path(tmp), torch.device("cpu"),
                                   progress=False, log=lines.append)
            per_start = _per_start(Path(tmp), cfg, table, apix) if starts > 1 else None
        e = pose_errors(table.poses(), table.shifts_px(apix), res["poses"], res["shifts"])
        last_soft = [s for s in lines if "soft" in s][-1]
        rows.append({"minibatch": mb, "starts": starts, "seed": seed, "per_start": per_start,
                     "median_rotation_error_deg": e["median_rotation_error_deg"],
                     "last_soft_round": last_soft,
                     "hard_median_confidence": float(np.median(res["confidence"])),
                     "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"sim": str(sim), "n": n, "D": src.D, "soft_rounds": args.soft, "rows": rows}, indent=1))
    return 0


def _per_start(run: Path, cfg, table, apix: float) -> list[dict]:
    """Each start's probe scores (checkpoints/starts.json) with its median rotation error on the images of
    its last soft round, against the truth: was the chosen start a converged one?"""
    from drgn_core.abinit.compare import pose_errors
    from drgn_core.abinit.rounds import load_round, round_path, starts_path

    record = json.loads(starts_path(run).read_text())
    out = []
    for sc in record["starts"]:
        chosen = sc["start"] == record["chosen"]  # the chosen start's rounds are the run's own
        last = load_round(round_path(run, cfg.soft_iterations - 1, None if chosen else sc["start"]))
        r = last["rows"]
        e = pose_errors(table.poses()[r], table.shifts_px(apix)[r], last["poses"], last["shifts"])
        out.append({**sc, "chosen": chosen,
                    "soft_median_rotation_error_deg": e["median_rotation_error_deg"]})
    return out


if __name__ == "__main__":
    sys.exit(main())
