"""drgn abinit against the truth and against training on the true poses, on simulated sets (issue 20's Tests).

For each set (`drgn simulate`: continuous hinge, compositional states, or homogeneous; D, N and SNR given),
the script runs `drgn abinit` from scratch and `drgn train` on the simulator's poses with the same model,
learning rate, batch size, seed and epochs, then prints JSON with:

- the search's and the refined poses' median rotation / shift errors after the best global rotation and
  hand (`drgn_core.abinit.compare.pose_errors`);
- heterogeneous sets: the latent's |Spearman ρ| with the hinge coordinate (continuous) or the k-means ARI
  with the states (compositional), `drgn_core.evaluate`, for both runs and their difference;
- homogeneous sets: the decoded map's FSC(0.5) and FSC(0.143) against the ground-truth map, for the ab
  initio run after bringing its map into the true frame (`compare.map_in_true_frame`) and for the true-pose
  run, and their ratio (target: the ab initio resolution within 20 % of the true-pose one);
- wall and CPU seconds of each phase, the load average and peak RSS.

    python bench/abinit_accuracy.py --kind continuous --n 1000 --D 64 --snr 0.1 --zdim 1 --epochs 6
    python bench/abinit_accuracy.py --kind none --n 1000 --D 64 --snr 0.1 --zdim 0 --epochs 6

Extra `drgn abinit` options (search settings) go after `--abinit`, e.g. `--abinit "--iterations 12"`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(); the drgn commands' messages go to stderr, so stdout stays JSON."""
    w0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(sys.stderr):
        fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _decoded_map(run: Path, out: Path) -> np.ndarray:
    from drgn_core.cli import main
    from drgn_core.io.mrc import read_mrc

    with contextlib.redirect_stdout(sys.stderr):
        assert main(["volumes", str(run), "-o", str(out)]) == 0
    return np.array(read_mrc(out / "vol_000.mrc", mmap=False)[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["continuous", "compositional", "none"], default="continuous")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--zdim", type=int, default=1)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="--enc-dim 256 --enc-layers 3 --dec-dim 256 --dec-layers 3",
                   help="model options given to both runs (default: drgn train's defaults)")
    p.add_argument("--abinit", default="", help="further drgn abinit options (search settings)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (default 0)")
    p.add_argument("--sim-seed", type=int, help="seed of the simulated set (default: --seed)")
    p.add_argument("--workdir", help="keep data and runs here (default: a temporary folder)")
    args = p.parse_args()

    import torch

    from drgn_core.abinit.compare import map_in_true_frame, map_resolution, pose_errors
    from drgn_core.cli import main as drgn
    from drgn_core.evaluate import cluster_metric, spearman_metric
    from drgn_core.io.mrc import read_mrc
    from drgn_core.io.table import read_table
    from drgn_core.simulate import SimConfig, run_simulation

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        sim = work / f"sim_{args.kind}_{args.D}_{args.n}_{args.snr}_{args.sim_seed}"
        if not (sim / "table.star").exists():
            cfg = SimConfig(n=args.n, D=args.D, snr=args.snr, heterogeneity=args.kind,
                            seed=args.seed if args.sim_seed is None else args.sim_seed)
            run_simulation(cfg, sim, progress=False)
        common = ["--zdim", str(args.zdim), *shlex.split(args.model), "--lr", str(args.lr), "--epochs",
                  str(args.epochs), "--seed", str(args.seed), "--threads", str(args.threads)]
        ab, tr = work / f"abinit_{sim.name}", work / f"true_{sim.name}"
        t_ab = _timed(lambda: drgn(["abinit", str(sim / "table.star"), str(sim / "particles.mrcs"), "-o",
                                    str(ab), *common, *shlex.split(args.abinit),
                                    *(["--resume"] if (ab / "config.yaml").exists() else [])]))
        t_tr = (0.0, 0.0)
        if not (tr / "z.npy").exists():
            t_tr = _timed(lambda: drgn(["train", str(sim / "table.star"), str(sim / "particles.mrcs"), "-o",
                                        str(tr), *common, "--val-frac", "0"]))
        table = read_table(sim / "table.star")
        apix = float(table.optics["rlnImagePixelSize"].iloc[0])
        last = sorted((ab / "checkpoints").glob("search_*.npz"))[-1]
        with np.load(last) as z:
            searched = pose_errors(table.poses(), table.shifts_px(apix), z["poses"], z["shifts"])
        found = read_table(ab / "poses.star")
        refined = pose_errors(table.poses(), table.shifts_px(apix), found.poses(), found.shifts_px(apix))
        out: dict = {"kind": args.kind, "n": args.n, "D": args.D, "snr": args.snr, "zdim": args.zdim,
                     "epochs": args.epochs, "lr": args.lr, "model": args.model, "abinit_options": args.abinit,
                     "search": {k: v for k, v in searched.items() if not isinstance(v, np.ndarray)},
                     "refined": {k: v for k, v in refined.items() if not isinstance(v, np.ndarray)},
                     "abinit_wall_s": t_ab[0], "abinit_cpu_s": t_ab[1], "true_pose_train_wall_s": t_tr[0],
                     "true_pose_train_cpu_s": t_tr[1]}
        if args.kind == "continuous":
            coord = table.gt("drgnGtCoord")
            a = spearman_metric(np.load(ab / "z.npy"), coord)["value"]
            b = spearman_metric(np.load(tr / "z.npy"), coord)["value"]
            out["latent"] = {"metric": "|spearman rho|", "abinit": a, "true_poses": b, "difference": b - a}
        elif args.kind == "compositional":
            states = table.gt("drgnGtState")
            a = cluster_metric(np.load(ab / "z.npy"), states)["ari"]
            b = cluster_metric(np.load(tr / "z.npy"), states)["ari"]
            out["latent"] = {"metric": "ARI", "abinit": a, "true_poses": b, "difference": b - a}
        else:
            gt_id = int(table.gt("drgnGtVolume")[0])
            truth = np.array(read_mrc(sim / "gt_volumes" / f"vol_{gt_id:03d}.mrc", mmap=False)[0])
            m_ab = map_in_true_frame(_decoded_map(ab, work / f"vol_ab_{sim.name}"), truth,
                                     np.array(refined["global_rotation"]), refined["hand"])
            m_tr = _decoded_map(tr, work / f"vol_tr_{sim.name}")
            res = {f"{name}_fsc{t}_A": map_resolution(m, truth, apix, t)
                   for name, m in (("abinit", m_ab), ("true_poses", m_tr)) for t in (0.5, 0.143)}
            res["ratio_fsc0.5"] = res["abinit_fsc0.5_A"] / res["true_poses_fsc0.5_A"]
            out["map"] = res
        out["load_average"] = os.getloadavg()
        out["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
