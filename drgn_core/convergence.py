"""How much a training run still changes from one epoch to the next (`drgn convergence`, `--epochs auto`).

cryoDRGN's maintainers answer "how many epochs?" with "compare outputs, not loss": the loss keeps creeping
down long after the latent space and the maps stopped changing in any way a user would see. This module
compares two epochs' outputs with three measures, each 0..1 and each blind to what does not matter:

- **latent change** (`latent_change`): the fraction of one epoch's latent variance that the best affine
  map of the other epoch's latent cannot explain (least squares, both directions averaged). A VAE's
  latent may rotate, flip, shift or stretch between epochs without reordering anything; an affine map
  absorbs all of that (it includes the orthogonal Procrustes alignment), so only a real reorganisation
  counts. 0: the same latent up to an affine map.
- **neighbours kept** (`neighbours_kept`): for a fixed, seeded sample of particles, the mean fraction of
  each one's k nearest neighbours (within the sample) that are still among its k nearest in the other
  epoch. It sees local reordering that a global fit averages away. 1: every neighbourhood kept.
- **map agreement** (`map_agreement`): the FSC between the two epochs' maps decoded at the same particles'
  latents (on-data points chosen once by k-means, `choose_rows`), read as the FSC-AUC divided by its
  largest possible value (drgn_core.fsc). 1: identical maps at every frequency.

Snapshots are what `drgn train --encode-every N` (and `--epochs auto`, every epoch) leaves in
`RUN/checkpoints`: z.EEE.npy (latent means of every particle) and model.EEE.pt (the weights) after
epoch EEE; the finished run's z.npy and model.pt are the last snapshot.

`settled(...)` is the stopping rule of `--epochs auto`; its thresholds are module constants, chosen and
justified in docs/architecture.md § Convergence and bench/README.md.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError

# --- the stopping rule of --epochs auto (docs/architecture.md § Convergence) --------------------------
AUTO_MAX_LATENT_CHANGE = 0.06   # the latent moves by at most 6 % of its variance (after an affine fit) ...
AUTO_PLATEAU = 0.03             # ... or its change levelled off: the median of the last 3 pairs within
                                #     3 % of the 3 before's
AUTO_NEIGHBOUR_FRACTION = 0.80  # no reorganisation: neighbours kept >= 80 % of the best value so far
AUTO_MIN_MAP_AGREEMENT = 0.75   # maps at the on-data points agree to FSC-AUC >= 75 % of the maximum (mean)
AUTO_PATIENCE = 3               # all of it for this many consecutive epoch pairs
AUTO_MIN_EPOCHS = 6             # and never before this many epochs
AUTO_DEFAULT_MAX_EPOCHS = 50    # --epochs auto without --max-epochs

NEIGHBOURS_K = 10
NEIGHBOURS_SAMPLE = 2000
FIT_SAMPLE = 20000
MAP_POINTS = 6
MEASURES = ("latent_change", "neighbours_kept", "map_agreement")


# ---- the measures -----------------------------------------------------------------------------------
def _sample(n: int, m: int, seed: int) -> np.ndarray:
    """A sorted seeded sample of min(n, m) of n rows: the same rows for every pair of epochs."""
    if n <= m:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 0xC0]).choice(n, m, replace=False))


def _unexplained(target: np.ndarray, source: np.ndarray) -> float:
    """Fraction of target's variance left after the least-squares affine map from source."""
    t = target - target.mean(axis=0)
    total = float((t**2).sum())
    if total <= 0:
        return 0.0
    x = np.concatenate([source - source.mean(axis=0), np.ones((len(source), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(x, t, rcond=None)
    return float(((t - x @ coef) ** 2).sum() / total)


def latent_change(z_a: np.ndarray, z_b: np.ndarray, seed: int = 0, sample: int = FIT_SAMPLE) -> float:
    """Mean fraction of each latent's variance that an affine map of the other cannot explain (0..1).

    Both directions, because one latent collapsing onto a line is perfectly 'explained' by a richer one.
    """
    a, b = np.asarray(z_a, np.float64), np.asarray(z_b, np.float64)
    if a.shape != b.shape:
        raise InputError(f"latents of different shapes {a.shape} and {b.shape}: not the same run's epochs")
    rows = _sample(len(a), sample, seed)
    a, b = a[rows], b[rows]
    return 0.5 * (_unexplained(a, b) + _unexplained(b, a))


def neighbours_kept(z_a: np.ndarray, z_b: np.ndarray, k: int = NEIGHBOURS_K, seed: int = 0,
                    sample: int = NEIGHBOURS_SAMPLE) -> float:
    """Mean fraction of each sampled particle's k nearest neighbours (within the sample) kept (0..1)."""
    from sklearn.neighbors import NearestNeighbors

    rows = _sample(len(z_a), sample, seed)
    k = min(k, len(rows) - 1)
    if k < 1:
        return 1.0

    def knn(z: np.ndarray) -> np.ndarray:
        zs = np.asarray(z, np.float64)[rows]
        idx = NearestNeighbors(n_neighbors=k + 1).fit(zs).kneighbors(zs, return_distance=False)
        return np.sort(idx[:, 1:], axis=1)  # itself dropped (first: distance 0)

    na, nb = knn(z_a), knn(z_b)
    kept = [len(np.intersect1d(x, y, assume_unique=True)) for x, y in zip(na, nb)]
    return float(np.mean(kept) / k)


def map_agreement(vols_a: np.ndarray, vols_b: np.ndarray) -> np.ndarray:
    """Per point: FSC-AUC between the two epochs' maps / the largest possible AUC ((D/2-1)/D) → (m,)."""
    from drgn_core.fsc import fsc_auc, fsc_curve

    out = []
    for va, vb in zip(vols_a, vols_b):
        freq, fsc = fsc_curve(va, vb)
        D = va.shape[0]
        out.append(fsc_auc(freq, fsc) / ((D // 2 - 1) / D))
    return np.asarray(out, dtype=np.float64)


def choose_rows(z: np.ndarray, k: int = MAP_POINTS, seed: int = 0) -> np.ndarray:
    """k on-data points, chosen once: the particles nearest to k-means centres of z (rows of z, sorted)."""
    from drgn_core.analysis import kmeans, nearest_rows

    k = min(k, len(z))
    _, centres = kmeans(z, k, seed=seed)
    return np.unique(nearest_rows(z, centres))


def pair_measures(z_a: np.ndarray, z_b: np.ndarray, vols_a: np.ndarray | None, vols_b: np.ndarray | None,
                  seed: int = 0) -> dict:
    """The three measures between two epochs; map agreement is the mean over the points (None without
    maps), its worst point and every point's value are kept too."""
    maps = None if vols_a is None or vols_b is None else map_agreement(vols_a, vols_b)
    return {"latent_change": latent_change(z_a, z_b, seed),
            "neighbours_kept": neighbours_kept(z_a, z_b, seed=seed),
            "map_agreement": None if maps is None else float(maps.mean()),
            "map_agreement_worst": None if maps is None else float(maps.min()),
            "map_agreement_per_point": None if maps is None else [float(x) for x in maps]}


def _latent_settled(history: list[dict], patience: int) -> tuple[bool, str]:
    """The latent part of the rule on the last `patience` pairs: small, or levelled off (neither falling,
    which says training still improves it, nor rising, which says the latent is reorganising)."""
    last = [h["latent_change"] for h in history[-patience:]]
    if max(last) <= AUTO_MAX_LATENT_CHANGE:
        return True, f"the latent changed by <= {max(last):.4f} of its variance per epoch"
    before = [h["latent_change"] for h in history[-2 * patience:-patience]]
    if len(before) == patience and abs(np.median(last) / np.median(before) - 1) <= AUTO_PLATEAU:
        return True, (f"the latent's change per epoch levelled off (median {np.median(last):.4f} against "
                      f"{np.median(before):.4f} {patience} epochs before)")
    return False, ""


def settled(history: list[dict], epoch: int, patience: int = AUTO_PATIENCE,
            min_epochs: int = AUTO_MIN_EPOCHS) -> str | None:
    """The stopping rule: a sentence saying why training may stop after `epoch`, or None to go on.

    `history` holds the measures of consecutive epoch pairs (each with 'epoch': the later epoch), oldest
    first. Training may stop when, for the last `patience` pairs, (1) the latent changed by at most
    AUTO_MAX_LATENT_CHANGE per epoch, or its change levelled off (AUTO_PLATEAU); (2) each kept at least
    AUTO_NEIGHBOUR_FRACTION of the best neighbours-kept value so far (no reorganisation under way); (3) the
    maps' mean agreement was at least AUTO_MIN_MAP_AGREEMENT; and `epoch` >= min_epochs.
    """
    if epoch < min_epochs or len(history) < patience:
        return None
    last = history[-patience:]
    if [h["epoch"] for h in last] != list(range(epoch - patience + 1, epoch + 1)):
        return None
    ok, latent_text = _latent_settled(history, patience)
    best_nn = max(h["neighbours_kept"] for h in history)
    worst_nn = min(h["neighbours_kept"] for h in last)
    maps = [h["map_agreement"] for h in last if h.get("map_agreement") is not None]
    blurred = bool(maps) and min(maps) < AUTO_MIN_MAP_AGREEMENT
    if not ok or worst_nn < AUTO_NEIGHBOUR_FRACTION * best_nn or blurred:
        return None
    map_text = f", the maps agreed to >= {min(maps):.3f} (FSC-AUC / max)" if maps else ""
    return (f"settled after epoch {epoch}: for {patience} consecutive epochs {latent_text}, >= "
            f"{worst_nn:.3f} of the nearest neighbours were kept (best {best_nn:.3f}){map_text}")


# ---- snapshots of a run ---------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """One epoch's outputs: latent means of every particle and the weights."""

    epoch: int
    z: Path
    model: Path


def list_snapshots(run: str | os.PathLike) -> list[Snapshot]:
    """The run's snapshots, by epoch: checkpoints/z.EEE.npy with model.EEE.pt, then the final outputs."""
    import yaml

    run = Path(run)
    if not (run / "config.yaml").exists():
        raise InputError("has no config.yaml: not a drgn train run directory", run)
    snaps = []
    for zf in sorted((run / "checkpoints").glob("z.[0-9][0-9][0-9].npy")):
        epoch = int(re.fullmatch(r"z\.(\d{3})\.npy", zf.name).group(1))
        mf = zf.with_name(f"model.{epoch:03d}.pt")
        if mf.exists():
            snaps.append(Snapshot(epoch, zf, mf))
    if (run / "model.pt").exists() and (run / "z.npy").exists():
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        stopped = (cfg.get("stopped") or {}).get("epoch")
        final = int(stopped or cfg.get("training", {}).get("epochs", 0))
        if final and all(s.epoch != final for s in snaps):
            snaps.append(Snapshot(final, run / "z.npy", run / "model.pt"))
    snaps.sort(key=lambda s: s.epoch)
    if len(snaps) < 2:
        raise InputError(f"has {len(snaps)} epoch snapshot(s); comparing epochs needs two or more: train "
                         "with --encode-every 1 (or --epochs auto), which keeps checkpoints/z.EEE.npy and "
                         "model.EEE.pt", run)
    return snaps


def decode_at(model_file: Path, z: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Maps (m, D, D, D) of one snapshot's weights at latent points z (m, zdim)."""
    from drgn_core.rundir import decode_volumes

    return decode_volumes(model_file, z, device=device)[0]


def epoch_pair(prev: Snapshot, cur: Snapshot, rows: np.ndarray | None, seed: int, device: str = "cpu",
               z_prev: np.ndarray | None = None, vols_prev: np.ndarray | None = None
               ) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """Measures between two snapshots → (measures with 'epoch' = cur.epoch, cur's z, cur's maps).

    The maps are decoded with each epoch's weights at that epoch's latents of the same particles (`rows`),
    so the comparison follows particles, not coordinates that mean different things in two epochs.
    Returning cur's latent and maps lets a caller walking epoch by epoch decode each snapshot once.
    """
    from drgn_core.rundir import read_npy

    za = read_npy(prev.z) if z_prev is None else z_prev
    zb = read_npy(cur.z, len(za), f"epoch {prev.epoch}'s latent")
    za2, zb2 = za.reshape(len(za), -1), zb.reshape(len(zb), -1)
    va = vb = None
    if rows is not None:
        va = decode_at(prev.model, za2[rows], device) if vols_prev is None else vols_prev
        vb = decode_at(cur.model, zb2[rows], device)
    m = pair_measures(za2, zb2, va, vb, seed)
    return {"epoch": cur.epoch, "previous_epoch": prev.epoch, **m}, zb2, vb


def convergence(run: str | os.PathLike, outdir: str | os.PathLike, points: int = MAP_POINTS, seed: int = 0,
                device: str = "cpu", progress: bool = True) -> dict:
    """`drgn convergence`: the measures for every pair of consecutive snapshots, JSON and plots in outdir.

    The on-data points for the maps are chosen once, on the last snapshot's latent (the one a user
    analyses), and followed back through the earlier epochs.
    """
    from drgn_core.io.atomic import atomic_path
    from drgn_core.progress import progress_bar
    from drgn_core.rundir import read_npy

    run, outdir = Path(run), Path(outdir)
    snaps = list_snapshots(run)
    z_last = read_npy(snaps[-1].z)
    rows = choose_rows(z_last.reshape(len(z_last), -1), points, seed) if points > 0 else None
    pairs: list[dict] = []
    z_prev = vols_prev = None
    for a, b in progress_bar(list(itertools.pairwise(snaps)), desc="epoch pairs", unit="pair",
                             file=sys.stderr, disable=not progress):
        m, z_prev, vols_prev = epoch_pair(a, b, rows, seed, device, z_prev, vols_prev)
        pairs.append(m)
    stop_at = next((h["epoch"] for h in pairs if settled([p for p in pairs if p["epoch"] <= h["epoch"]],
                                                         h["epoch"])), None)
    result = {"run": str(run.resolve()), "epochs": [s.epoch for s in snaps], "pairs": pairs,
              "map_rows": None if rows is None else [int(r) for r in rows], "seed": seed,
              "rule": {"max_latent_change": AUTO_MAX_LATENT_CHANGE, "plateau": AUTO_PLATEAU,
                       "neighbour_fraction_of_best": AUTO_NEIGHBOUR_FRACTION,
                       "min_map_agreement": AUTO_MIN_MAP_AGREEMENT, "patience": AUTO_PATIENCE,
                       "min_epochs": AUTO_MIN_EPOCHS},
              "auto_would_stop_after": stop_at}
    outdir.mkdir(parents=True, exist_ok=True)
    plot_convergence(pairs, outdir / "convergence.png", stop_at)
    with atomic_path(outdir / "convergence.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    return result


def plot_convergence(pairs: list[dict], path: Path, stop: int | None = None) -> None:
    """Three panels, one per measure against the later epoch of each pair, with the auto rule's limits
    and (dashed) the epoch after which the rule stops, when it does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from drgn_core.io.atomic import atomic_path

    ep = [p["epoch"] for p in pairs]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=110)
    specs = [("latent_change", "latent change (1 − R², affine)", AUTO_MAX_LATENT_CHANGE, True),
             ("neighbours_kept", f"{NEIGHBOURS_K} nearest neighbours kept", None, False),
             ("map_agreement", "map agreement (FSC-AUC / max)", AUTO_MIN_MAP_AGREEMENT, False)]
    for ax, (key, label, limit, log) in zip(axes, specs):
        vals = [np.nan if p[key] is None else p[key] for p in pairs]
        ax.plot(ep, vals, "o-")
        if key == "map_agreement" and any(p.get("map_agreement_worst") is not None for p in pairs):
            ax.plot(ep, [p.get("map_agreement_worst") or np.nan for p in pairs], "s--", alpha=0.6)
            ax.legend(["mean over the points", "worst point"], fontsize=7)
        if limit is not None:
            ax.axhline(limit, ls=":", color="grey")
        if stop is not None:
            ax.axvline(stop, ls="--", color="tab:red", lw=1)
        ax.set_xlabel("epoch (vs the one before)")
        ax.set_title(label, fontsize=9)
        if log and all(v > 0 for v in vals if np.isfinite(v)):
            ax.set_yscale("log")
    fig.suptitle("change between consecutive epochs (dotted: the --epochs auto limits; dashed: its stop)",
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
