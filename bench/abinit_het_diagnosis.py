"""Why a heterogeneous ab initio latent falls short of the true-pose one: pose errors split by state.

Given a simulated set (`drgn simulate`) and a `drgn abinit` run on it, prints JSON with:

- the run's rotation errors after the best global rotation and hand (`compare.pose_errors`): median,
  percentiles and the fraction of images more than 30° off (the heavy tail a median hides);
- per state group (quantile bins of the hinge coordinate drgnGtCoord, or the states drgnGtState): the
  median error, the fraction > 30°, the error after the group's OWN global rotation ("own frame"), and how
  far that rotation is from the global one ("drift") with its axis, and (continuous sets) the cosine
  between that axis and the simulator's hinge axis;
- with `--controls`, the latent metric (|Spearman ρ| or ARI, `drgn_core.evaluate`) of `drgn train` runs on
  the same images and settings with (a) the true poses, (b) the true poses carrying each group's drift
  (A_true·G_group: the frame drift alone, no per-image error) and (c) the true poses with isotropic random
  rotation errors of the same median as the run's own-frame error (per-image error alone, no tail, no
  drift). Which control loses the metric says what the ab initio poses must fix.

    python bench/abinit_accuracy.py --kind continuous --n 1000 --D 32 --snr 1 --zdim 1 --epochs 8 \
      --threads 2 --seed 3 --model "--enc-dim 128 --enc-layers 2 --dec-dim 128 --dec-layers 2" \
      --workdir /tmp/het --abinit "--L-min 10 --L-max 14 --keep 4 --pose-start 2"
    python bench/abinit_het_diagnosis.py --sim /tmp/het/sim_continuous_32_1000_1.0_None \
      --run /tmp/het/abinit_sim_continuous_32_1000_1.0_None --controls --zdim 1 --epochs 8 --seed 3 \
      --model "--enc-dim 128 --enc-layers 2 --dec-dim 128 --dec-layers 2"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np


def _groups(table, bins: int) -> tuple[np.ndarray, str]:
    if "drgnGtCoord" in table.particles and np.ptp(table.gt("drgnGtCoord")) > 0:
        c = table.gt("drgnGtCoord")
        return np.searchsorted(np.quantile(c, np.linspace(0, 1, bins + 1)[1:-1]), c), "continuous"
    return table.gt("drgnGtState").astype(np.int64), "compositional"


def _metric(kind: str, z: np.ndarray, table) -> float:
    from drgn_core.evaluate import cluster_metric, spearman_metric

    if kind == "continuous":
        return spearman_metric(z, table.gt("drgnGtCoord"))["value"]
    return cluster_metric(z, table.gt("drgnGtState"))["ari"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sim", required=True, help="drgn simulate folder (table.star, particles.mrcs, gt.json)")
    p.add_argument("--run", required=True, help="drgn abinit run directory on that set")
    p.add_argument("--bins", type=int, default=5, help="quantile bins of the hinge coordinate (default 5)")
    p.add_argument("--controls", action="store_true", help="train the three control runs (see above)")
    p.add_argument("--zdim", type=int, default=1)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="", help="drgn train model options, as given to the ab initio run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", help="keep the control runs here (default: a temporary folder)")
    args = p.parse_args()

    from scipy.spatial.transform import Rotation

    from drgn_core.abinit.compare import MIRROR, fit_global_rotation, pose_errors
    from drgn_core.abinit.run import with_poses
    from drgn_core.cli import main as drgn
    from drgn_core.io.table import read_table, write_table

    sim, run = Path(args.sim), Path(args.run)
    truth, found = read_table(sim / "table.star"), read_table(run / "poses.star")
    apix = float(truth.optics["rlnImagePixelSize"].iloc[0])
    A_t, A_f = truth.poses(), found.poses()
    e = pose_errors(A_t, truth.shifts_px(apix), A_f, found.shifts_px(apix))
    if e["hand"] == "flipped":
        A_f = MIRROR @ A_f @ MIRROR
    G = np.array(e["global_rotation"])
    err = e["rotation_error"]
    group, kind = _groups(truth, args.bins)
    gt = json.loads((sim / "gt.json").read_text())
    axis = np.array(gt["hinge"]["axis"]) if isinstance(gt.get("hinge"), dict) else None
    out: dict = {"run": str(run), "kind": kind, "hand": e["hand"],
                 "median_rotation_error_deg": float(np.median(err)),
                 "percentiles_10_25_50_75_90_deg": [round(float(x), 2) for x in
                                                    np.percentile(err, [10, 25, 50, 75, 90])],
                 "fraction_over_30deg": float((err > 30).mean()), "groups": []}
    drifted, own_err = A_t.copy(), np.zeros(len(err))
    for g in np.unique(group):
        m = group == g
        # each group's own frame, in its own hand: maps reconstructed per class have independent hands
        hands = ((A_f[m], "same"), (MIRROR @ A_f[m] @ MIRROR, "flipped"))
        fits = [(fit_global_rotation(A_t[m], Af), hand) for Af, hand in hands]
        (Gg, own_err[m]), own_hand = min(fits, key=lambda f: np.median(f[0][1]))
        rv = Rotation.from_matrix(Gg @ G.T).as_rotvec()
        row = {"group": int(g), "n": int(m.sum()), "median_error_deg": float(np.median(err[m])),
               "fraction_over_30deg": float((err[m] > 30).mean()),
               "own_frame_median_error_deg": float(np.median(own_err[m])),
               "own_frame_hand": "as the global one" if own_hand == "same" else "mirrored",
               "drift_deg": float(np.degrees(np.linalg.norm(rv)))}
        if axis is not None and np.linalg.norm(rv) > 1e-9:
            cos = abs(rv @ axis) / np.linalg.norm(rv) / np.linalg.norm(axis)
            row["drift_axis_cos_hinge_axis"] = float(cos)
        out["groups"].append(row)
        drifted[m] = A_t[m] @ Gg if own_hand == "same" else MIRROR @ (A_t[m] @ Gg) @ MIRROR
    out["own_frame_median_error_deg"] = float(np.median(own_err))
    out["latent_abinit"] = _metric(kind, np.load(run / "z.npy"), truth)
    if args.controls:
        rng = np.random.default_rng(args.seed)
        v = rng.normal(size=(len(A_t), 3))
        v *= np.radians(out["own_frame_median_error_deg"]) / np.median(np.linalg.norm(v, axis=1))
        noisy = A_t @ Rotation.from_rotvec(v).as_matrix()
        rows = np.arange(len(truth))
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.workdir or tmp)
            work.mkdir(parents=True, exist_ok=True)
            out["controls"] = {}
            for name, A in (("true_poses", A_t), ("true_poses_with_group_drift", drifted),
                            ("true_poses_with_random_error", noisy)):
                table = work / f"{name}.star"
                write_table(with_poses(truth, rows, A, truth.shifts_px(apix) * apix), table)
                with contextlib.redirect_stdout(sys.stderr):
                    drgn(["train", str(table), str(sim / "particles.mrcs"), "-o", str(work / name),
                          "--zdim", str(args.zdim), *shlex.split(args.model), "--lr", str(args.lr),
                          "--epochs", str(args.epochs), "--seed", str(args.seed), "--threads",
                          str(args.threads), "--val-frac", "0"])
                out["controls"][name] = _metric(kind, np.load(work / name / "z.npy"), truth)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
