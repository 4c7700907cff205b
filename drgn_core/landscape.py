"""Landscape analysis (`drgn landscape`): structural states found in the space of maps, not of latents.

cryoDRGN's `analyze_landscape` / `analyze_landscape_full` recipe, in one consistent pass:

1. choose `n_maps` latent points: k-means centres of z, moved on-data (the particle nearest each centre);
2. decode them in chunks (`rundir.decode_volumes`) and write each map straight to `maps/vol_NNN.mrc`,
   while the mask grows: each map's voxels above `threshold` × its own maximum, unioned over maps, then
   dilated by `dilate` voxels (or a user's mask);
3. PCA of the masked voxels, streamed from the written maps chunk by chunk (scikit-learn's
   IncrementalPCA), so memory is bounded by one chunk of maps, never all of them at full size;
4. cluster the maps' volume-PC coordinates into states (average-linkage agglomerative, or a GMM);
5. give every particle a state and volume-PC coordinates, and per state the index file, the mean and
   the spread maps.

One mapping, used everywhere (plots, `particle_states.npy`, index files, `drgn explore`, `drgn export`):
a particle belongs to the landscape map whose latent is nearest its own (`nearest_map`), and takes that
map's state. cryoDRGN's #414 came from two tools each mapping particles their own way; here the labels are
computed once and every consumer reads `particle_states.npy`.

Volume-PC coordinates of particles come from a small network z → volume PCs (scikit-learn's
MLPRegressor) fitted on the decoded maps, with the held-out R² per PC reported: decoding a map per
particle is out of reach for 10⁶ particles.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError
from drgn_core.io.indices import write_index_files

# cryoDRGN 4.3's analyze_landscape defaults (what a GPU run uses) and ours for a 2-core laptop
GPU_MAPS, GPU_BOX = 1000, 128
CPU_MAPS, CPU_BOX = 300, 64
N_PCS = 20
N_STATES = 10
THRESHOLD = 0.5          # fraction of each map's maximum that enters the mask
DILATE = 5               # voxels
CHUNK = 32               # maps held in memory at once
TRAVERSAL_PCS = 3        # volume PCs with maps along them
TRAVERSAL_POINTS = 10
KMEANS_MAX_FIT = 100_000  # k-means for the map latents is fitted on at most this many particles
REGRESSOR_LAYERS = (64, 64)  # hidden layers of the z → volume-PC network
HELD_OUT_FRAC = 0.2      # maps held out of the z → volume-PC regressor, for its reported R²


@dataclass
class LandscapeOptions:
    """Every choice of a landscape analysis (recorded in summary.json)."""

    n_maps: int | None = None      # None: GPU_MAPS on a GPU, CPU_MAPS on the CPU
    D: int | None = None           # None: min(GPU_BOX or CPU_BOX, training box)
    n_pcs: int = N_PCS
    n_states: int = N_STATES
    cluster: str = "agglomerative"  # or "gmm"
    linkage: str = "average"
    mask: str | None = None
    threshold: float = THRESHOLD
    dilate: int = DILATE
    chunk: int = CHUNK
    traversal_pcs: int = TRAVERSAL_PCS
    traversal_points: int = TRAVERSAL_POINTS
    umap: str | None = None
    seed: int = 0
    device: str = "auto"


# ---- the one particle → map → state mapping -------------------------------------------------------------
def nearest_map(z: np.ndarray, map_z: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """For each particle, the landscape map whose latent is nearest (Euclidean) → (N,) int64 map ids.

    THE mapping of particles to maps (and, through the maps' states, to states): every output and every
    consumer of a landscape folder uses it, through `particle_states.npy`. Chunked over particles so the
    distance block is at most `chunk` × n_maps.
    """
    mz = np.asarray(map_z, dtype=np.float64)
    mm = (mz**2).sum(axis=1)
    out = np.empty(len(z), dtype=np.int64)
    for a in range(0, len(z), chunk):
        zc = np.asarray(z[a:a + chunk], dtype=np.float64)
        out[a:a + chunk] = np.argmin(mm[None, :] - 2.0 * zc @ mz.T, axis=1)
    return out


# ---- choosing and decoding the maps ---------------------------------------------------------------------
def landscape_latents(z: np.ndarray, n_maps: int, seed: int = 0) -> np.ndarray:
    """Rows of z whose latents are decoded: on-data k-means centres (k = n_maps), as cryoDRGN.

    k-means is fitted on a seeded subsample of at most KMEANS_MAX_FIT particles (its cost grows with N × k,
    and 10⁵ points already place 1000 centres); on-data rows are then found among all particles. Two
    centres may share their nearest particle; the duplicates are dropped, so slightly fewer maps result.
    """
    from drgn_core.analysis import kmeans, nearest_rows

    rng = np.random.default_rng(seed)
    fit = z if len(z) <= KMEANS_MAX_FIT else z[np.sort(rng.choice(len(z), KMEANS_MAX_FIT, replace=False))]
    _, centres = kmeans(fit, n_maps, seed=seed)
    rows = nearest_rows(z, centres)
    _, first = np.unique(rows, return_index=True)
    return rows[np.sort(first)]


def read_user_mask(path: str | os.PathLike, D: int) -> np.ndarray:
    """A user's mask (.mrc of box D; voxels > 0.5 are inside) → bool (D, D, D), with one-line errors."""
    from drgn_core.io.mrc import read_mrc

    path = Path(path)
    if not path.exists():
        raise InputError("no such mask file", path)
    try:
        data, _ = read_mrc(path, mmap=False)
    except InputError:
        raise
    except Exception as e:  # mrcfile's many errors for a file that is not an MRC
        raise InputError(f"cannot read as an MRC mask ({type(e).__name__}: {e})", path) from None
    if data.shape != (D, D, D):
        raise InputError(f"mask has shape {data.shape} but the maps are decoded at box {D} (give -D "
                         f"{data.shape[-1]} or a mask of box {D})", path)
    mask = np.asarray(data) > 0.5
    if not mask.any():
        raise InputError("mask has no voxel above 0.5: nothing to analyse", path)
    return mask


def dilate_mask(mask: np.ndarray, voxels: int) -> np.ndarray:
    """Grow a mask by a sphere of radius `voxels` (distance ≤ voxels from the mask), as cryoDRGN's 5 px."""
    if voxels <= 0:
        return mask
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~mask) <= voxels


class MapSeries:
    """The written maps, read back one at a time from their memory-mapped .mrc files (a lazy sequence)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        from drgn_core.io.mrc import read_mrc

        return np.asarray(read_mrc(self.paths[i], mmap=True)[0], dtype=np.float32)

    def chunk(self, rows: np.ndarray) -> np.ndarray:
        return np.stack([self[int(i)] for i in rows])


def decode_maps(run_dir: Path, map_z: np.ndarray, outdir: Path, D: int, threshold: float, chunk: int,
                device: str) -> tuple[MapSeries, np.ndarray, float]:
    """Decode the maps chunk by chunk into outdir/vol_NNN.mrc → (series, half-max union mask, voxel size).

    Only `chunk` maps are in memory at once; each map's mask contribution (voxels above `threshold` × its
    maximum) is taken while it is in memory, so the mask needs no second decoding pass.
    """
    from tqdm import tqdm

    from drgn_core.io.mrc import write_mrc
    from drgn_core.rundir import decode_volumes
    from drgn_core.volumes import volume_name

    outdir.mkdir(parents=True, exist_ok=True)
    m = len(map_z)
    union = np.zeros((D, D, D), dtype=bool)
    paths: list[Path] = []
    vox = 1.0
    for a in tqdm(range(0, m, chunk), desc="landscape maps", unit="chunk", file=sys.stderr,
                  disable=m <= chunk):
        vols, vox = decode_volumes(run_dir, map_z[a:a + chunk], D=D, device=device)
        for j, v in enumerate(vols):
            top = float(v.max())
            if top > 0:
                union |= v > threshold * top
            p = outdir / volume_name("vol", a + j, m)
            write_mrc(p, v, vox)
            paths.append(p)
    with open(outdir / "z_values.txt", "w") as f:
        f.write(f"# latent value of each volume (vol_NNN.mrc is row NNN); zdim = {map_z.shape[1]}\n")
        for row in map_z:
            f.write(" ".join(f"{x:.8g}" for x in row) + "\n")
    return MapSeries(paths), union, vox


# ---- PCA of the masked voxels ---------------------------------------------------------------------------
@dataclass
class VolumePCA:
    """Volume PCs over the masked voxels: mean (n_vox,), components (k, n_vox), explained variance."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) @ self.components.T).astype(np.float32)


def _batches(m: int, size: int) -> list[np.ndarray]:
    """Row batches of at least `size` maps (a short last batch is merged into the one before it)."""
    edges = [*range(0, m, size), m]
    if len(edges) > 2 and edges[-1] - edges[-2] < size:
        edges.pop(-2)
    return [np.arange(a, b) for a, b in itertools.pairwise(edges)]


def streamed_pca(series: MapSeries, mask: np.ndarray, n_pcs: int, chunk: int
                 ) -> tuple[VolumePCA, np.ndarray]:
    """IncrementalPCA of the maps' masked voxels, reading `chunk` maps at a time → (pca, coords (m, k)).

    Two passes over the written maps (fit, then transform); only one chunk of masked voxels is ever in
    memory besides the k components. Each PC's sign is fixed so its largest-magnitude loading is positive,
    as `analysis.fit_pca` does for latents, so coordinates are reproducible.
    """
    from sklearn.decomposition import IncrementalPCA
    from tqdm import tqdm

    m = len(series)
    batches = _batches(m, max(chunk, n_pcs))
    ipca = IncrementalPCA(n_components=n_pcs)
    for rows in tqdm(batches, desc="volume PCA", unit="chunk", file=sys.stderr, disable=len(batches) < 3):
        ipca.partial_fit(series.chunk(rows)[:, mask].astype(np.float64))
    comps = ipca.components_.copy()
    flip = np.sign(comps[np.arange(len(comps)), np.argmax(np.abs(comps), axis=1)])
    comps *= np.where(flip == 0, 1.0, flip)[:, None]
    pca = VolumePCA(ipca.mean_.astype(np.float64), comps, ipca.explained_variance_,
                    ipca.explained_variance_ratio_)
    coords = np.empty((m, n_pcs), dtype=np.float32)
    for rows in batches:
        coords[rows] = pca.transform(series.chunk(rows)[:, mask].astype(np.float64))
    return pca, coords


# ---- states ---------------------------------------------------------------------------------------------
def cluster_maps(coords: np.ndarray, n_states: int, method: str = "agglomerative", linkage: str = "average",
                 seed: int = 0) -> np.ndarray:
    """States of the maps from their volume-PC coordinates → (m,) int64, numbered by increasing PC1.

    Numbering by the states' mean PC1 (rather than the algorithm's arbitrary ids) makes a state's number
    reproducible and, for a continuous motion, ordered along it.
    """
    if not 1 <= n_states <= len(coords):
        raise InputError(f"--states {n_states} is more than the {len(coords)} maps of the landscape (give "
                         "fewer states or more --maps)" if n_states > len(coords) else
                         f"--states must be >= 1, got {n_states}")
    if method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        labels = AgglomerativeClustering(n_clusters=n_states, linkage=linkage).fit_predict(coords)
    elif method == "gmm":
        from sklearn.mixture import GaussianMixture

        labels = GaussianMixture(n_components=n_states, covariance_type="full", reg_covar=1e-4,
                                 n_init=4, random_state=seed).fit(coords).predict(coords)
    else:
        raise InputError(f"--cluster must be agglomerative or gmm, got {method!r}")
    ids = np.unique(labels)
    order = ids[np.argsort([coords[labels == i, 0].mean() for i in ids], kind="stable")]
    renumber = np.empty(int(labels.max()) + 1, dtype=np.int64)
    renumber[order] = np.arange(len(order))
    return renumber[labels]


def state_maps(series: MapSeries, map_states: np.ndarray, weights: np.ndarray, state: int, chunk: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread (standard deviation) of one state's maps, each weighted by its particles.

    Weighting by the particles each map stands for makes the mean the state's average particle, not the
    average of k-means centres (sparse regions get as many centres as dense ones). Streamed: two D³
    float64 accumulators and one chunk of maps.
    """
    rows = np.nonzero(map_states == state)[0]
    w = weights[rows].astype(np.float64)
    if w.sum() == 0:  # a state whose maps hold no particle: weigh its maps equally
        w = np.ones_like(w)
    s1 = s2 = None
    for a in range(0, len(rows), chunk):
        v = series.chunk(rows[a:a + chunk]).astype(np.float64)
        wc = w[a:a + chunk, None, None, None]
        s1 = (wc * v).sum(0) if s1 is None else s1 + (wc * v).sum(0)
        s2 = (wc * v * v).sum(0) if s2 is None else s2 + (wc * v * v).sum(0)
    mean = s1 / w.sum()
    spread = np.sqrt(np.clip(s2 / w.sum() - mean**2, 0.0, None))
    return mean.astype(np.float32), spread.astype(np.float32)


# ---- every particle in volume-PC space ------------------------------------------------------------------
def fit_z_to_pcs(map_z: np.ndarray, coords: np.ndarray, seed: int = 0):
    """A small network z → volume-PC coordinates, fitted on the maps → (predict function, held-out R² per PC).

    HELD_OUT_FRAC of the maps (seeded) are kept out of the fit and give the reported R²; the returned
    predictor is the network fitted on the rest, so the reported error is that of what is used.
    Inputs and outputs are standardised so every PC weighs the same in the fit. Full-batch L-BFGS on one
    thread: the sample is at most a few thousand maps, where stochastic minibatches only add iterations and
    BLAS threads only add overhead.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import r2_score
    from sklearn.neural_network import MLPRegressor
    from threadpoolctl import threadpool_limits

    m = len(map_z)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(m)
    n_test = round(HELD_OUT_FRAC * m) if m >= 10 else 0
    test, train = perm[:n_test], perm[n_test:]
    zm, zs = map_z[train].mean(0), map_z[train].std(0) + 1e-8
    cm, cs = coords[train].mean(0), coords[train].std(0) + 1e-8
    net = MLPRegressor(hidden_layer_sizes=REGRESSOR_LAYERS, solver="lbfgs", alpha=1e-3, max_iter=2000,
                       random_state=seed)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        net.fit((map_z[train] - zm) / zs, (coords[train] - cm) / cs)

    def predict(z: np.ndarray, chunk: int = 262_144) -> np.ndarray:
        out = np.empty((len(z), coords.shape[1]), dtype=np.float32)
        for a in range(0, len(z), chunk):
            p = net.predict((np.asarray(z[a:a + chunk], dtype=np.float64) - zm) / zs)
            out[a:a + chunk] = p.reshape(len(p), -1) * cs + cm
        return out

    r2 = (r2_score(coords[test], predict(map_z[test]), multioutput="raw_values").tolist()
          if n_test >= 2 else [])
    return predict, r2


# ---- the whole analysis ---------------------------------------------------------------------------------
def resolve_defaults(opts: LandscapeOptions, train_box: int, n_particles: int, on_gpu: bool
                     ) -> tuple[int, int]:
    """(n_maps, D): the user's, else the GPU or CPU default (the box never above the training box)."""
    n_maps = opts.n_maps if opts.n_maps is not None else (GPU_MAPS if on_gpu else CPU_MAPS)
    D = opts.D if opts.D is not None else min(GPU_BOX if on_gpu else CPU_BOX, train_box)
    if n_maps < 2:
        raise InputError(f"--maps must be >= 2, got {n_maps}")
    if D % 2 or D < 8:
        raise InputError(f"-D must be an even box size >= 8, got {D}")
    return min(n_maps, n_particles), D


def _versions() -> dict:
    import sklearn
    import torch

    from drgn_core import __version__

    return {"drgnflow": __version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "torch": str(torch.__version__)}


def landscape(run_dir: str | os.PathLike, outdir: str | os.PathLike, opts: LandscapeOptions) -> dict:
    """Run the landscape analysis of one training run into `outdir` (written whole, atomically) → summary."""
    from drgn_core import plots
    from drgn_core.analysis import check_outdir, run_umap
    from drgn_core.io.atomic import atomic_dir
    from drgn_core.io.mrc import write_mrc
    from drgn_core.rundir import load_run, read_npy, resolve_device, run_model
    from drgn_core.train import sha256
    from drgn_core.volumes import write_volume_series

    run = load_run(run_dir)
    model_path = run.run_dir / "model.pt"
    if not model_path.exists():
        raise InputError("the run has no model.pt: a landscape needs the trained decoder to make maps "
                         "(is the training finished?)", model_path)
    outdir = Path(outdir)
    inputs = [run.run_dir] + [Path(p) for p in (opts.mask, opts.umap) if p]
    check_outdir(outdir, inputs)
    if opts.cluster not in ("agglomerative", "gmm"):
        raise InputError(f"--cluster must be agglomerative or gmm, got {opts.cluster!r}")
    if not 0 < opts.threshold < 1 or opts.dilate < 0 or opts.chunk < 1 or opts.n_pcs < 1:
        raise InputError("need 0 < --threshold < 1, --dilate >= 0, --chunk >= 1 and --pcs >= 1 (got "
                         f"{opts.threshold}, {opts.dilate}, {opts.chunk}, {opts.n_pcs})")
    device = resolve_device(opts.device)
    _, cfg = run_model(run.run_dir, str(device))
    n_maps, D = resolve_defaults(opts, cfg.D, run.n, device.type == "cuda")
    if opts.n_states > n_maps:
        raise InputError(f"--states {opts.n_states} is more than the {n_maps} maps of the landscape (give "
                         "fewer states or more --maps)")
    user_mask = read_user_mask(opts.mask, D) if opts.mask else None
    umap_xy = read_npy(opts.umap, run.n, "UMAP embedding") if opts.umap else None
    if umap_xy is not None and (umap_xy.ndim != 2 or umap_xy.shape[1] != 2):
        raise InputError(f"expected an (N, 2) UMAP embedding, got shape {umap_xy.shape}", opts.umap)

    clock = {"start": time.perf_counter()}

    def lap(name: str) -> None:
        clock[name] = time.perf_counter()

    z = run.z
    rows = landscape_latents(z, n_maps, seed=opts.seed)
    lap("kmeans")
    map_z = z[rows]
    m = len(rows)
    if opts.n_states > m:
        raise InputError(f"--states {opts.n_states} is more than the {m} distinct maps of the landscape")
    summary: dict = {"run": str(run.run_dir), "n_particles": run.n, "zdim": run.zdim, "D": D,
                     "options": asdict(opts), "n_maps": m, "device": str(device),
                     "inputs": {"model_sha256": sha256(model_path),
                                "z_sha256": sha256(run.run_dir / "z.npy")},
                     "versions": _versions()}

    with atomic_dir(outdir) as tmp:
        # 1-2. maps and mask
        series, union, vox = decode_maps(run.run_dir, map_z, tmp / "maps", D, opts.threshold, opts.chunk,
                                         str(device))
        summary["apix"] = vox
        write_index_files(run.indices[rows], tmp / "maps" / "centers_ind.npy")
        if user_mask is not None:
            mask, summary["mask"] = user_mask, {"source": str(opts.mask)}
        else:
            if not union.any():
                raise InputError("every decoded map is zero or negative: no density to mask (is the model "
                                 "trained?)", model_path)
            mask = dilate_mask(union, opts.dilate)
            summary["mask"] = {"source": "computed", "threshold": opts.threshold, "dilate": opts.dilate}
        summary["mask"]["n_voxels"] = int(mask.sum())
        lap("decode_and_mask")
        write_mrc(tmp / "mask.mrc", mask.astype(np.float32), vox)
        picks = np.unique(np.linspace(0, m - 1, min(m, 20)).round().astype(int))
        plots.volume_sheet([series[int(i)] for i in picks], tmp / "maps" / "maps.png",
                           names=[series.paths[int(i)].stem for i in picks],
                           title=f"landscape: {len(picks)} of {m} maps, D = {D}, {vox:.3g} Å/voxel")

        # 3. volume PCA
        k = int(min(opts.n_pcs, m - 1, mask.sum()))
        pca, coords = streamed_pca(series, mask, k, opts.chunk)
        np.save(tmp / "vol_pca.npy", coords)
        lap("pca")
        summary["vol_pca"] = {"n_pcs": k, "explained_variance_ratio": pca.explained_variance_ratio.tolist()}
        plots.explained_variance(pca.explained_variance_ratio, tmp / "vol_pca_explained_variance.png")
        tr = []
        for i in range(min(opts.traversal_pcs, k)):
            t = np.linspace(*np.percentile(coords[:, i], (5, 95)), opts.traversal_points)
            vols = np.zeros((len(t), D, D, D), dtype=np.float32)
            vols[:, mask] = pca.mean[None, :] + t[:, None] * pca.components[i][None, :]
            write_volume_series(vols, t[:, None], tmp / f"vol_pc{i + 1}", vox)
            tr.append({"pc": i + 1, "folder": f"vol_pc{i + 1}", "t": t.tolist()})
        summary["vol_pc_traversals"] = tr

        # 4. states of the maps, and of the particles through the one mapping
        map_states = cluster_maps(coords, opts.n_states, opts.cluster, opts.linkage, opts.seed)
        np.save(tmp / "map_states.npy", map_states)
        particle_map = nearest_map(z, map_z)
        states = map_states[particle_map]
        np.save(tmp / "particle_states.npy", states)
        np.save(tmp / "particle_map.npy", particle_map)
        weights = np.bincount(particle_map, minlength=m)
        n_s = int(map_states.max()) + 1
        counts = np.bincount(states, minlength=n_s)
        means = []
        (tmp / "states").mkdir()
        for s in range(n_s):
            sd = tmp / "states" / f"state_{s}"
            sd.mkdir()
            if counts[s]:
                write_index_files(run.indices[states == s], sd / "indices.npy")
            mean, spread = state_maps(series, map_states, weights, s, opts.chunk)
            write_mrc(sd / "mean.mrc", mean, vox)
            write_mrc(sd / "spread.mrc", spread, vox)
            means.append(mean)
        plots.volume_sheet(means, tmp / "states" / "means.png", names=[f"state {s}" for s in range(n_s)],
                           title=f"state mean maps, D = {D}, {vox:.3g} Å/voxel")
        del means
        with open(tmp / "states" / "states.csv", "w") as f:
            f.write("state,n_particles,fraction,n_maps\n")
            for s in range(n_s):
                f.write(f"{s},{int(counts[s])},{counts[s] / run.n:.4f},{int((map_states == s).sum())}\n")
        summary["states"] = {"method": opts.cluster, "linkage": opts.linkage if opts.cluster ==
                             "agglomerative" else None, "n_states": n_s, "counts": counts.tolist(),
                             "n_maps": np.bincount(map_states, minlength=n_s).tolist(),
                             "empty": [s for s in range(n_s) if counts[s] == 0]}

        lap("states")

        # 5. every particle in volume-PC space
        predict, r2 = fit_z_to_pcs(map_z, coords, seed=opts.seed)
        pcs_particles = predict(z)
        np.save(tmp / "particle_vol_pca.npy", pcs_particles)
        summary["regressor"] = {"model": f"MLP {REGRESSOR_LAYERS} (scikit-learn, L-BFGS)", "held_out_maps":
                                round(HELD_OUT_FRAC * m) if m >= 10 else 0, "r2_per_pc": r2}

        lap("regressor")

        # plots
        names = {s: f"state {s}" for s in range(n_s)}
        ev = pca.explained_variance_ratio
        lab = (f"volume PC1 ({100 * ev[0]:.1f}%)",
               f"volume PC2 ({100 * ev[1]:.1f}%)" if k > 1 else "map number")
        mxy = coords[:, :2] if k > 1 else np.column_stack([coords[:, 0], np.arange(m)])
        plots.categories_2d(mxy, map_states, tmp / "vol_pca_maps_states.png", *lab, names=names,
                            title=f"{m} landscape maps by state", label_centres=True, seed=opts.seed)
        pxy = pcs_particles[:, :2] if k > 1 else np.column_stack([pcs_particles[:, 0], z[:, 0]])
        plots.categories_2d(pxy, states, tmp / "vol_pca_particles_states.png", lab[0],
                            lab[1] if k > 1 else "z1", names=names, label_centres=True, seed=opts.seed,
                            title=f"{run.n} particles (volume PCs predicted from z)")
        if umap_xy is None and run.zdim > 2 and run.n > 16:
            umap_xy = run_umap(z, seed=opts.seed).embedding
            np.save(tmp / "umap.npy", umap_xy)
        if umap_xy is not None:
            xy, ax = umap_xy, ("UMAP1", "UMAP2")
        elif run.zdim == 2:
            xy, ax = z, ("z1", "z2")
        else:
            xy, ax = np.column_stack([z[:, 0], pcs_particles[:, 0]]), ("z1", "volume PC1 (predicted)")
        plots.categories_2d(xy, states, tmp / "states_umap.png", *ax, names=names, label_centres=True,
                            seed=opts.seed, title="landscape states of the particles")
        plots.bars(counts, tmp / "state_sizes.png", "state", "particles",
                   title=f"{int(counts.sum())} particles in {n_s} states")

        lap("plots")
        marks = list(clock.items())
        summary["seconds"] = {name: round(t - marks[i][1], 2) for i, (name, t) in enumerate(marks[1:])}
        summary["seconds"]["total"] = round(marks[-1][1] - marks[0][1], 2)
        summary["outputs"] = {"plots": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*.png"))}
        with open(tmp / "summary.json", "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def state_indices(landscape_dir: str | os.PathLike, state: int) -> Path:
    """The index file of one state of a landscape folder (for `drgn export --landscape DIR --state K`)."""
    d = Path(landscape_dir)
    if not (d / "summary.json").exists():
        raise InputError("is not a drgn landscape folder (no summary.json)", d)
    n_s = int(json.loads((d / "summary.json").read_text())["states"]["n_states"])
    if not 0 <= state < n_s:
        raise InputError(f"--state {state} does not exist: the landscape has states 0 … {n_s - 1}", d)
    p = d / "states" / f"state_{state}" / "indices.npy"
    if not p.exists():
        raise InputError(f"state {state} holds no particles (its maps are nearest to none)", d)
    return p
