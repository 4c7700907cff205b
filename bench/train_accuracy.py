"""Accuracy of `drgn train` on the simulator's datasets, against ground truth, as JSON (metrics as
docs/architecture.md § Metrics on simulated data defines them).

The paper's simulated experiments at a size this project can afford: D = 64, ≥ 20,000 images, SNR 0.1.

    uniform / cooperative / noncontiguous   continuous hinge, zdim 1: |Spearman ρ(z, drgnGtCoord)|
                                            (paper: 0.996 / 0.992 / 0.988), per-image FSC-AUC
    compositional                           3 states, zdim 1: ARI of k-means (k = 3) on z, per-image FSC-AUC
    homogeneous                             zdim 0: FSC of the decoded map with the ground truth; the
                                            0.5 crossing as a fraction of Nyquist (target ≥ 0.8)

Per-image FSC: for --fsc-images images spread evenly over the ground truth (along the coordinate, or
evenly per state), the FSC between the map decoded at the image's z and its ground-truth map; AUC is the
trapezoid of |FSC| over r/D (maximum (D/2-1)/D). Every epoch's latents are kept (--encode-every 1), so the
JSON also shows how ρ / ARI evolve, and a run stopped early still reports its trajectory.

    nice -n 10 .venv/bin/python bench/train_accuracy.py --workdir /tmp/acc --threads 2 \\
        --datasets uniform compositional homogeneous --epochs 20

A killed benchmark restarts where it stopped: datasets are kept in --workdir and runs are resumed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DATASETS = {
    "uniform": {"heterogeneity": "continuous", "distribution": "uniform"},
    "cooperative": {"heterogeneity": "continuous", "distribution": "cooperative"},
    "noncontiguous": {"heterogeneity": "continuous", "distribution": "noncontiguous"},
    "compositional": {"heterogeneity": "compositional", "distribution": "uniform"},
    "homogeneous": {"heterogeneity": "none", "distribution": "uniform"},
}


def simulate(name: str, args: argparse.Namespace) -> Path:
    from drgn_core.simulate import SimConfig, run_simulation

    out = Path(args.workdir) / f"data_{name}_D{args.D}_n{args.n}"
    if not (out / "table.star").exists():
        cfg = SimConfig(n=args.n, D=args.D, snr=args.snr, seed=args.seed, **DATASETS[name])
        run_simulation(cfg, out, progress=True)
    return out


def train_run(name: str, data: Path, args: argparse.Namespace) -> Path:
    from drgn_core.train import train

    run = Path(args.workdir) / f"run_{name}_{args.tag}"
    width, layers = (int(x) for x in args.arch.lower().split("x"))
    dec_width, dec_layers = (int(x) for x in (args.dec_arch or args.arch).lower().split("x"))
    model = {"zdim": 0 if name == "homogeneous" else args.zdim, "enc_dim": width, "enc_layers": layers,
             "dec_dim": dec_width, "dec_layers": dec_layers}
    opts = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "val_frac": args.val_frac,
            "threads": args.threads, "precision": args.precision, "device": args.device,
            "encode_every": 1 if name != "homogeneous" else 0}
    resume = (run / "config.yaml").exists()
    if not (resume and _model_epochs(run) >= args.epochs):
        train(data / "table.star", data / "particles.mrcs", run, model, opts, resume=resume)
    return run


def _model_epochs(run: Path) -> int:
    """Epochs behind the run's model.pt (0 if none). Not config.yaml's: a run resumed for more epochs
    and killed records the new target there while model.pt and z.npy are still the earlier run's."""
    import torch

    if not (run / "model.pt").exists():
        return 0
    return int(torch.load(run / "model.pt", map_location="cpu", weights_only=True).get("epochs", 0))


def gt_volume(data: Path, gid: int, cache: dict) -> np.ndarray:
    from drgn_core.io.mrc import read_mrc

    if gid not in cache:
        cache[gid] = read_mrc(data / "gt_volumes" / f"vol_{gid:03d}.mrc", mmap=False)[0].astype(np.float64)
    return cache[gid]


def pick_even(coord: np.ndarray, states: np.ndarray, n: int) -> np.ndarray:
    """n positions spread evenly along the coordinate (continuous) or evenly within each state."""
    if np.isfinite(coord).all() and np.ptp(coord) > 0:
        order = np.argsort(coord, kind="stable")
        return order[np.round(np.linspace(0, len(order) - 1, n)).astype(int)]
    picks = []
    for s in np.unique(states):
        members = np.flatnonzero(states == s)
        picks.append(members[np.round(np.linspace(0, len(members) - 1, max(1, n // len(np.unique(states)))))
                             .astype(int)])
    return np.concatenate(picks)


def per_image_fsc(run: Path, data: Path, z: np.ndarray, gt_ids: np.ndarray) -> dict:
    from drgn_core.fsc import crossing, fsc_auc, fsc_curve
    from drgn_core.models import generate_volumes, load_model

    model, cfg = load_model(run)
    cache: dict = {}
    aucs, res = [], []
    for a in range(0, len(z), 8):
        for vol, gid in zip(generate_volumes(model, cfg, z[a:a + 8]), gt_ids[a:a + 8]):
            freq, fsc = fsc_curve(vol, gt_volume(data, int(gid), cache))
            aucs.append(fsc_auc(freq, fsc))
            res.append(crossing(freq, fsc, 0.5, cfg.apix))
    return {"n_images": len(aucs), "auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
            "auc_max_possible": float(freq[-1]), "resolution_0.5_mean_A": float(np.mean(res)),
            "resolution_0.5_std_A": float(np.std(res))}


def evaluate(name: str, run: Path, data: Path, args: argparse.Namespace) -> dict:
    from scipy.stats import spearmanr
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from drgn_core.io.table import read_table

    table = read_table(data / "table.star")
    idx = np.load(run / "indices.npy")
    coord = table.gt("drgnGtCoord").astype(np.float64)[idx]
    states = table.gt("drgnGtState").astype(np.int64)[idx]
    vol_ids = table.gt("drgnGtVolume").astype(np.int64)[idx]
    log = np.genfromtxt(run / "train_log.csv", delimiter=",", names=True, ndmin=1)
    out = {"epochs": int(log["epoch"][-1]), "train_seconds": float(log["seconds"].sum()),
           "images_per_s": float(np.median(log["images_per_s"])),
           "final_val_loss": None if np.isnan(log["val_loss"][-1]) else float(log["val_loss"][-1])}
    if name == "homogeneous":
        from drgn_core.fsc import crossing, fsc_auc, fsc_curve
        from drgn_core.models import generate_volumes, load_model

        model, cfg = load_model(run)
        freq, fsc = fsc_curve(generate_volumes(model, cfg, None)[0], gt_volume(data, int(vol_ids[0]), {}))
        res = crossing(freq, fsc, 0.5, cfg.apix)
        out.update({"fsc_auc": fsc_auc(freq, fsc), "resolution_0.5_A": res, "nyquist_A": 2 * cfg.apix,
                    "fraction_of_nyquist_0.5": 2 * cfg.apix / res, "fsc": [round(float(f), 4) for f in fsc]})
        return out

    held_out = np.isin(idx, np.load(run / "val_indices.npy"))

    def score_rows(z: np.ndarray, rows: np.ndarray) -> float:
        if name == "compositional":
            k = len(np.unique(states))
            labels = KMeans(k, n_init=10, random_state=args.seed).fit_predict(z[rows])
            return float(adjusted_rand_score(states[rows], labels))
        return float(abs(spearmanr(z[rows, 0], coord[rows]).statistic))

    def score(z: np.ndarray) -> dict:
        key = "ari" if name == "compositional" else "abs_spearman"
        out = {key: score_rows(z, np.ones(len(z), bool))}
        if held_out.any():  # the encoder on images it never trained on, and on those it did
            out[f"{key}_trained"] = score_rows(z, ~held_out)
            out[f"{key}_held_out"] = score_rows(z, held_out)
        return out

    out["trajectory"] = {p.name.split(".")[1]: score(np.load(p))
                         for p in sorted((run / "checkpoints").glob("z.*.npy"))}
    z = np.load(run / "z.npy")
    out.update(score(z))
    pick = pick_even(coord, states, args.fsc_images)
    out["per_image_fsc"] = per_image_fsc(run, data, z[pick], vol_ids[pick])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("-D", "--D", type=int, default=64)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--zdim", type=int, default=1)
    ap.add_argument("--arch", default="256x3", help="WIDTHxLAYERS of the encoder (and decoder)")
    ap.add_argument("--dec-arch", default=None, help="WIDTHxLAYERS of the decoder (paper: 512x5); "
                    "default --arch")
    ap.add_argument("--val-frac", type=float, default=0.0,
                    help="held-out fraction; the paper's simulated experiments trained on every image (0)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fsc-images", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the run folders (to compare settings)")
    ap.add_argument("--workdir", required=True, help="datasets and runs are kept here (and resumed)")
    args = ap.parse_args()
    args.tag = args.tag or (f"{args.arch}_{args.dec_arch or args.arch}_{args.precision}_lr{args.lr:g}"
                            f"_b{args.batch_size}_val{args.val_frac:g}")

    results = {}
    for name in args.datasets:
        t0 = time.time()
        data = simulate(name, args)
        run = train_run(name, data, args)
        res = {"dataset": name, "D": args.D, "n": args.n, "snr": args.snr, "arch": args.arch,
               "dec_arch": args.dec_arch or args.arch, "val_frac": args.val_frac,
               "precision": args.precision, "lr": args.lr, "batch_size": args.batch_size,
               **evaluate(name, run, data, args), "wall_s": time.time() - t0}
        results[name] = res
        print(json.dumps(res), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
