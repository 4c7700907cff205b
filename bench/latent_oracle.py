"""The best |Spearman ρ| (continuous) or ARI (compositional) any encoder could reach on a simulated
dataset, as JSON.

An oracle that knows the ground-truth maps, every image's pose, shift and CTF, and the noise level scores
each image against all of the dataset's ground-truth maps (Gaussian log-likelihood of the image given the
rendered map) and reports the posterior mean of the reaction coordinate. Its |Spearman ρ| with the true
coordinate is the information limit of the images themselves: the bar that `drgn train`'s latents are
measured against in bench/train_accuracy.py (the paper's 0.99 is only meaningful where the oracle clears
it). For the 20,000-image uniform hinge at D = 64, SNR 0.1 it is 0.997. For a compositional dataset the
oracle assigns each image its most likely state (MAP with the true populations as prior) and reports the
ARI against the true states.

    .venv/bin/python bench/latent_oracle.py /tmp/acc/data_uniform_D64_n20000 --images 1000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def oracle(data: Path, n_images: int, seed: int) -> dict:
    import torch
    from scipy.stats import spearmanr

    from drgn_core.io.mrc import read_mrc
    from drgn_core.io.table import read_table
    from drgn_core.projection import prepare_volume_ft, render_images

    sigma = json.loads((data / "gt.json").read_text())["noise_sigma"]
    table = read_table(data / "table.star")
    coord = table.gt("drgnGtCoord")
    true_map = table.gt("drgnGtVolume").astype(np.int64)
    usable = np.flatnonzero(true_map >= 0)
    rows = np.sort(np.random.default_rng(seed).choice(usable, min(n_images, len(usable)), replace=False))
    A = torch.from_numpy(table.poses()[rows]).float()
    shifts = torch.from_numpy(table.shifts_px()[rows])
    ctf = torch.from_numpy(table.ctf_params()[rows]).float()
    images = torch.from_numpy(np.asarray(read_mrc(data / "particles.mrcs", mmap=True)[0][rows], np.float32))
    maps = sorted((data / "gt_volumes").glob("vol_*.mrc"))
    loglik = np.zeros((len(rows), len(maps)))
    for j, path in enumerate(maps):
        vol = torch.from_numpy(read_mrc(path, mmap=False)[0].astype(np.float32))
        clean = render_images(prepare_volume_ft(vol), A, shifts, ctf)
        loglik[:, j] = -((images - clean) ** 2).sum(dim=(1, 2)).double().numpy() / (2 * sigma**2)
    true_map = true_map[rows]
    if not np.isfinite(coord[rows]).all():  # compositional: one map per state
        from sklearn.metrics import adjusted_rand_score

        prior = np.bincount(table.gt("drgnGtVolume")[usable].astype(np.int64), minlength=len(maps))
        best = (loglik + np.log(np.maximum(prior, 1) / prior.sum())).argmax(axis=1)
        return {"n_images": len(rows), "n_maps": len(maps),
                "ari_map": float(adjusted_rand_score(true_map, best)),
                "map_exact": float(np.mean(best == true_map))}
    map_coord = np.linspace(0.0, 1.0, len(maps))  # map j sits at c = j / (n_maps - 1)
    post = np.exp(loglik - loglik.max(axis=1, keepdims=True))
    post /= post.sum(axis=1, keepdims=True)
    mean = post @ map_coord
    best = loglik.argmax(axis=1)
    return {"n_images": len(rows), "n_maps": len(maps),
            "abs_spearman_posterior_mean": float(abs(spearmanr(mean, coord[rows]).statistic)),
            "abs_spearman_map": float(abs(spearmanr(best, coord[rows]).statistic)),
            "map_exact": float(np.mean(best == true_map)),
            "map_within_one": float(np.mean(np.abs(best - true_map) <= 1)),
            "posterior_sd_mean": float(np.sqrt(np.maximum(post @ map_coord**2 - mean**2, 0)).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="a drgn simulate output folder of a continuous dataset")
    ap.add_argument("--images", type=int, default=1000, help="images scored (a random sample)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    t0 = time.time()
    res = oracle(args.data, args.images, args.seed)
    print(json.dumps({"data": str(args.data), **res, "wall_s": round(time.time() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
