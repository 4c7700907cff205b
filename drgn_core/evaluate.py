"""Accuracy of a trained run against a simulated dataset's ground truth (`drgn evaluate`, docs/architecture.md
§ Metrics on simulated data).

Metrics, exactly as docs/architecture.md § Metrics on simulated data defines them:

- |Spearman ρ| between a 1-D summary of the latent (z itself for zdim = 1, else PC1) and the ground-truth
  reaction coordinate drgnGtCoord, over the non-junk particles with a finite coordinate.
- ARI and NMI (arithmetic normalisation) between k-means clusters of z, with K = the number of true
  states, and drgnGtState, over the non-junk particles (junk has state -1).
- Precision, recall and F1 of a filter's removed set against drgnGtJunk (given a `drgn filter` folder).
- Per-image FSC: for n images sampled evenly (along the sorted ground-truth coordinate, or in equal
  numbers from each state), the FSC between the volume decoded at the image's z and its ground-truth
  volume gt_volumes/vol_{drgnGtVolume:03d}.mrc; FSC-AUC is the trapezoid of |FSC| over r/D; reported
  as mean ± std, with the mean resolution at FSC = 0.5. The curve itself is `drgn_core.fsc.fsc_curve`
  (shells r-1 <= |k|·D < r, FSC(0) = 1), shared with `drgn fsc`. Ground-truth maps in a box larger than
  the model's are Fourier-cropped to the model's box first (same physical size), so both maps hold the
  same frequencies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError


def latent_summary_1d(z: np.ndarray) -> np.ndarray:
    """The 1-D summary of a latent: z for zdim = 1, else the coordinate along PC1."""
    from drgn_core.analysis import fit_pca

    z = np.asarray(z)
    if z.shape[1] == 1:
        return z[:, 0].astype(np.float64)
    return fit_pca(z).transform(z)[:, 0].astype(np.float64)


def spearman_metric(z: np.ndarray, coord: np.ndarray, junk: np.ndarray | None = None) -> dict:
    """|Spearman ρ| between the latent's 1-D summary and the ground-truth coordinate."""
    from scipy.stats import spearmanr

    coord = np.asarray(coord, dtype=np.float64)
    use = np.isfinite(coord) & (np.ones(len(coord), bool) if junk is None else ~np.asarray(junk, bool))
    if use.sum() < 3 or np.ptp(coord[use]) == 0:
        return {"value": None, "reason": "no continuous ground-truth coordinate (drgnGtCoord) varies here"}
    s = latent_summary_1d(z)[use]
    rho = spearmanr(s, coord[use]).statistic
    return {"value": float(abs(rho)), "rho": float(rho), "n": int(use.sum()),
            "summary": "z" if z.shape[1] == 1 else "PC1"}


def cluster_metric(z: np.ndarray, states: np.ndarray, junk: np.ndarray | None = None, seed: int = 0) -> dict:
    """ARI and NMI (arithmetic) between k-means (K = number of true states) and the true states."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from drgn_core.analysis import kmeans

    states = np.asarray(states).astype(np.int64)
    use = states >= 0 if junk is None else (states >= 0) & ~np.asarray(junk, bool)
    k = len(np.unique(states[use]))
    if k < 2:
        return {"ari": None, "nmi": None, "k": k, "reason": "fewer than two ground-truth states"}
    labels, _ = kmeans(z[use], k, seed=seed)
    return {"ari": float(adjusted_rand_score(states[use], labels)),
            "nmi": float(normalized_mutual_info_score(states[use], labels, average_method="arithmetic")),
            "k": int(k), "n": int(use.sum()), "seed": seed}


def select_even(coord: np.ndarray, states: np.ndarray, usable: np.ndarray, n: int) -> np.ndarray:
    """n row positions spread evenly over the ground truth: along the sorted coordinate when there is a
    continuous one, else in (nearly) equal numbers from each state, evenly through each state's rows."""
    rows = np.nonzero(usable)[0]
    if len(rows) <= n:
        return rows
    coord = np.asarray(coord, dtype=np.float64)
    if np.isfinite(coord[rows]).all() and np.ptp(coord[rows]) > 0:
        order = rows[np.argsort(coord[rows], kind="stable")]
        return np.sort(order[np.round(np.linspace(0, len(order) - 1, n)).astype(np.int64)])
    values = np.unique(states[rows])
    per = np.full(len(values), n // len(values))
    per[: n % len(values)] += 1
    picks = []
    for v, c in zip(values, per):
        members = rows[states[rows] == v]
        c = min(c, len(members))
        if c:
            picks.append(members[np.round(np.linspace(0, len(members) - 1, c)).astype(np.int64)])
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def per_image_fsc(run_dir: str | os.PathLike, z: np.ndarray, gt_ids: np.ndarray, gt_dir: str | os.PathLike,
                  device: str = "auto") -> dict:
    """FSC between the volume decoded at each z[i] and ground-truth volume gt_ids[i] → summary + curves."""
    from drgn_core.fourier import downsample_volume
    from drgn_core.fsc import crossing, fsc_auc, fsc_curve
    from drgn_core.io.mrc import read_mrc
    from drgn_core.rundir import decode_volumes

    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise InputError("no such ground-truth volume folder", gt_dir)
    cache: dict[int, np.ndarray] = {}
    aucs, res, curves = [], [], []
    freq, apix = None, 1.0
    for a in range(0, len(z), 8):
        vols, apix = decode_volumes(run_dir, z[a:a + 8], device=device)
        D = vols.shape[-1]
        for vol, gid in zip(vols, gt_ids[a:a + 8]):
            gid = int(gid)
            if gid not in cache:
                f = gt_dir / f"vol_{gid:03d}.mrc"
                gt, _ = read_mrc(f, mmap=False)
                if gt.ndim != 3 or len(set(gt.shape)) != 1:
                    raise InputError(f"expected a cubic volume, got shape {gt.shape}", f)
                if gt.shape[0] < D or gt.shape[0] % 2:
                    raise InputError(f"has box {gt.shape[0]}, smaller than the model's {D} or odd", f)
                cache[gid] = np.asarray(downsample_volume(gt.astype(np.float64), D), dtype=np.float64)
            freq, fsc = fsc_curve(vol, cache[gid])
            curves.append(fsc)
            aucs.append(fsc_auc(freq, fsc))
            res.append(crossing(freq, fsc, 0.5, apix))
    aucs_a, res_a = np.array(aucs), np.array(res)
    return {"n_images": len(aucs), "auc_mean": float(aucs_a.mean()), "auc_std": float(aucs_a.std()),
            "auc_max_possible": float(freq[-1]) if freq is not None else None,
            "resolution_0.5_mean_A": float(res_a.mean()), "resolution_0.5_std_A": float(res_a.std()),
            "apix": apix, "freq": freq.tolist() if freq is not None else [],
            "mean_curve": np.mean(curves, axis=0).tolist() if curves else [],
            "_curves": np.array(curves)}


def evaluate(run_dir: str | os.PathLike, table_path: str | os.PathLike, out_json: str | os.PathLike,
             gt_dir: str | os.PathLike | None = None, filter_dir: str | os.PathLike | None = None,
             n_fsc: int = 100, seed: int = 0, plot: str | os.PathLike | None = None,
             device: str = "auto") -> dict:
    """Compute every metric the inputs allow and write them as JSON (atomically)."""
    from drgn_core.filtering import junk_scores
    from drgn_core.io.atomic import atomic_path
    from drgn_core.io.indices import read_index_file
    from drgn_core.io.table import GT_COLUMNS, read_table
    from drgn_core.rundir import held_out_mask, load_run

    run = load_run(run_dir)
    table = read_table(table_path)
    missing = [c for c in GT_COLUMNS if c not in table.particles]
    if missing:
        raise InputError(f"has no ground-truth columns ({', '.join(missing)}); drgn evaluate needs a "
                         "simulated dataset's table", table_path)
    if run.indices.max() >= len(table):
        raise InputError(f"has {len(table)} rows but the run uses row {int(run.indices.max())}: is it the "
                         "table the run was trained from?", table_path)
    sub = table.particles.iloc[run.indices]
    junk = sub["drgnGtJunk"].to_numpy(dtype=float) > 0
    coord = sub["drgnGtCoord"].to_numpy(dtype=np.float64)
    states = sub["drgnGtState"].to_numpy(dtype=np.int64)
    gt_vol = sub["drgnGtVolume"].to_numpy(dtype=np.int64)
    metrics: dict = {"run": str(run.run_dir), "table": str(table_path), "n_particles": run.n,
                     "zdim": run.zdim, "junk_in_run": int(junk.sum())}
    metrics["spearman"] = spearman_metric(run.z, coord, junk)
    metrics["clustering"] = cluster_metric(run.z, states, junk, seed=seed)
    held_out = held_out_mask(run.run_dir, run.indices)
    if held_out is not None:
        # The encoder of a few-thousand-particle run memorises its training images and does not
        # generalise: held-out latents can be noise while the trained ones are right. Say so.
        metrics["held_out"] = {
            "n": int(held_out.sum()),
            "spearman_trained": spearman_metric(run.z[~held_out], coord[~held_out], junk[~held_out])
            .get("value"),
            "spearman_held_out": spearman_metric(run.z[held_out], coord[held_out], junk[held_out])
            .get("value"),
        }
    if filter_dir is not None:
        fd = Path(filter_dir)
        kept, removed = (read_index_file(fd / f"{name}.npy", len(table), allow_empty=True)
                         for name in ("kept", "removed"))
        universe = np.union1d(kept, removed)
        metrics["filter"] = {"dir": str(fd), **junk_scores(removed, universe, table.gt("drgnGtJunk"))}
    curves = None
    if gt_dir is not None:
        if n_fsc < 1:
            raise InputError(f"--n-fsc must be >= 1, got {n_fsc}")
        pick = select_even(coord, states, (~junk) & (gt_vol >= 0), n_fsc)
        fsc = per_image_fsc(run.run_dir, run.z[pick], gt_vol[pick], gt_dir, device=device)
        curves = fsc.pop("_curves")
        metrics["per_image_fsc"] = {"gt_dir": str(gt_dir), "rows": run.indices[pick].tolist(), **fsc}
    out_json = Path(out_json)
    with atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    if plot is not None and curves is not None and len(curves):
        from drgn_core import plots

        plots.curves(np.array(metrics["per_image_fsc"]["freq"]), curves, plot, "frequency (1/px)", "FSC",
                     hlines=(0.5,), title=f"per-image FSC vs ground truth ({len(curves)} images)")
    return metrics
