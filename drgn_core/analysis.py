"""Latent-space analysis of a trained run: PCA, UMAP, k-means, PC traversals and volumes (`drgn analyze`).

The paper's Methods fix the recipe: PCA (scikit-learn-equivalent), 2-D UMAP with k = 15 neighbours and
min_dist 0.1, k-means with k = 20 whose "on-data" centres (the particle nearest each centre) give
representative volumes, volumes along PC1/PC2 between the 5th and 95th percentile, and, for a 1-D latent,
volumes at percentiles. This module computes them from `z.npy`; the functions here are also the single
definition that `drgn filter` and `drgn traverse` use, so cluster ids and PC coordinates agree between
an analysis folder and a filter spec written while looking at it.

Reading the run (`load_run`, `held_out_mask`) and decoding volumes (`write_volumes`) are
`drgn_core.rundir`'s; this module calls them and holds no model code of its own.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError
from drgn_core.io.indices import write_index_files
from drgn_core.rundir import held_out_mask, load_run, read_npy, write_volumes

UMAP_NEIGHBORS = 15
UMAP_MIN_DIST = 0.1
# above this many particles, UMAP is fitted on a subsample (docs/architecture.md § Data path and scale)
UMAP_MAX_FIT = 100_000
UMAP_EXACT_KNN = 4096     # umap-learn's own exact-distance threshold (below it, run_umap passes exact_knn)
ZDIM1_PERCENTILES = (5, 23, 41, 59, 77, 95)   # the paper's Fig. 3c points for a 1-D latent
PC_PERCENTILES = (5.0, 95.0)


# ---- PCA ------------------------------------------------------------------------------------------------
@dataclass
class PCA:
    """Principal axes of the latents. `components[i]` is PC i+1 (unit vector), sorted by variance.

    Computed from the zdim×zdim covariance (cheap for 10⁶ particles) rather than scikit-learn's SVD of
    the data; the axes are the same. Each axis' sign is fixed so that its largest-magnitude loading is
    positive, making PC coordinates reproducible across runs of the same data.
    """

    mean: np.ndarray                  # (zdim,)
    components: np.ndarray            # (zdim, zdim) rows = PCs
    explained_variance: np.ndarray    # (zdim,)

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        total = self.explained_variance.sum()
        return self.explained_variance / total if total > 0 else np.zeros_like(self.explained_variance)

    def transform(self, z: np.ndarray) -> np.ndarray:
        """(N, zdim) coordinates along every PC (float32)."""
        return ((z - self.mean) @ self.components.T).astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "components": self.components.tolist(),
                "explained_variance": self.explained_variance.tolist(),
                "explained_variance_ratio": self.explained_variance_ratio.tolist()}


def fit_pca(z: np.ndarray) -> PCA:
    """PCA of (N, zdim) latents (all components)."""
    z64 = np.asarray(z, dtype=np.float64)
    mean = z64.mean(axis=0)
    zc = z64 - mean
    cov = zc.T @ zc / max(len(z64) - 1, 1)
    var, vecs = np.linalg.eigh(cov)
    order = np.argsort(var)[::-1]
    var, comps = np.clip(var[order], 0.0, None), vecs[:, order].T
    flip = np.sign(comps[np.arange(len(comps)), np.argmax(np.abs(comps), axis=1)])
    comps = comps * np.where(flip == 0, 1.0, flip)[:, None]
    return PCA(mean, comps, var)


# ---- UMAP -----------------------------------------------------------------------------------------------
@dataclass
class UmapResult:
    embedding: np.ndarray                 # (N, 2) float32
    fit_rows: np.ndarray                  # rows of z the model was fitted on (all, or a subsample)
    info: dict = field(default_factory=dict)


def exact_knn(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, None]:
    """Exact Euclidean k nearest neighbours of every row, itself first → (indices (N, k), distances (N, k),
    None), the `precomputed_knn` that umap-learn accepts.

    Why: for fewer than 4,096 points umap-learn builds its neighbour graph from a full distance matrix
    that scikit-learn fills by calling umap's numba-compiled metric once per pair from Python, plus its
    JIT compilation: about 20 CPU-seconds for the demo's 2,500 latents, against well under one second for
    scikit-learn's own brute-force search, which returns the same neighbours.
    """
    from sklearn.neighbors import NearestNeighbors
    from threadpoolctl import threadpool_limits

    z64 = np.asarray(z, dtype=np.float64)
    with threadpool_limits(1):  # the neighbour order must not depend on the core count
        dist, idx = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(z64).kneighbors(z64)
    # the point itself first (a duplicate row may tie with it), at distance 0 exactly, as umap expects
    rows = np.arange(len(z64))
    selfpos = np.argmax(idx == rows[:, None], axis=1)
    has_self = idx[rows, selfpos] == rows
    swap = has_self & (selfpos > 0)
    idx[swap, selfpos[swap]] = idx[swap, 0]
    dist[swap, selfpos[swap]] = dist[swap, 0]
    idx[:, 0], dist[:, 0] = rows, 0.0
    return idx.astype(np.int32), dist.astype(np.float32), None


def cache_umap_kernels() -> int:
    """Let numba keep umap-learn's compiled kernels on disk, as it already does pynndescent's.

    Why: umap-learn compiles its graph and layout kernels (smooth_knn_dist, the membership strengths,
    optimize_layout_euclidean, ...) without numba's on-disk cache, so every process that fits a UMAP
    compiles them again: 11 s of CPU for a 3,000-point fit, of which 3 s is the fit itself once the
    kernels are cached (the same embedding, bit for bit). Each `drgn analyze`, `drgn landscape` and
    test process paid it. numba's cache is keyed by the function's source file, signature and CPU, so a
    new umap-learn version compiles afresh. Returns the number of kernels given a cache (0 when numba's
    API differs; the fit is then only slower).
    """
    try:
        import umap.distances
        import umap.layouts
        import umap.sparse
        import umap.spectral
        import umap.umap_
        import umap.utils
        from numba.core.caching import NullCache
        from numba.core.dispatcher import Dispatcher
    except ImportError:
        return 0
    n = 0
    for mod in (umap.umap_, umap.layouts, umap.utils, umap.spectral, umap.distances, umap.sparse):
        for obj in vars(mod).values():
            if isinstance(obj, Dispatcher) and isinstance(getattr(obj, "_cache", None), NullCache):
                try:
                    obj.enable_caching()
                    n += 1
                except Exception:  # an uncacheable kernel compiles at each fit, as before
                    pass
    return n


def run_umap(z: np.ndarray, seed: int = 0, n_neighbors: int = UMAP_NEIGHBORS, min_dist: float = UMAP_MIN_DIST,
             max_fit: int = UMAP_MAX_FIT, chunk: int = 100_000) -> UmapResult:
    """2-D UMAP of the latents, seeded.

    Up to `max_fit` particles the embedding is fitted on all of them. Above it, UMAP is fitted on a
    seeded random subsample of `max_fit` particles and the rest are placed with `transform` (in chunks,
    with a progress bar): fitting is superlinear in N while transform is linear, and a 10⁵-point fit
    already resolves the manifold's shape. UMAP's own random state makes it single-threaded; that is
    the price of reproducible embeddings.
    """
    import umap

    from drgn_core.progress import progress_bar

    cache_umap_kernels()
    n = len(z)
    if n <= n_neighbors:
        raise InputError(f"UMAP needs more than {n_neighbors} particles, the run has {n}")
    rng = np.random.default_rng(seed)
    fit_rows = np.arange(n) if n <= max_fit else np.sort(rng.choice(n, max_fit, replace=False))
    # Below UMAP_EXACT_KNN rows umap-learn computes every pairwise distance itself, through a numba metric
    # called once per pair from scikit-learn; handing it the same exact neighbours computed here gives
    # the same graph without that cost (see exact_knn). `transform` needs umap's own search index, so
    # only a fit on every row may take them.
    knn = exact_knn(z, n_neighbors) if n <= min(max_fit, UMAP_EXACT_KNN - 1) else (None, None, None)
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, n_components=2, random_state=seed,
                        precomputed_knn=knn)
    emb = np.empty((n, 2), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*overridden to 1 by setting random_state.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")  # no transform: all rows fitted
        warnings.filterwarnings("ignore", message=".*[Cc]annot cache.*")  # a kernel numba cannot cache
        emb[fit_rows] = reducer.fit_transform(z[fit_rows])
        rest = np.setdiff1d(np.arange(n), fit_rows, assume_unique=True)
        for a in progress_bar(range(0, len(rest), chunk), desc="umap transform", unit="chunk",
                              file=sys.stderr, disable=len(rest) == 0):
            rows = rest[a:a + chunk]
            emb[rows] = reducer.transform(z[rows])
    info = {"n_neighbors": n_neighbors, "min_dist": min_dist, "seed": seed, "fit_rows": len(fit_rows),
            "transformed_rows": int(n - len(fit_rows)), "max_fit": max_fit,
            "neighbours": "exact" if knn[0] is not None else "umap-learn"}
    return UmapResult(emb, fit_rows, info)


# ---- k-means and on-data points -------------------------------------------------------------------------
def kmeans(z: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means (scikit-learn, k-means++ init, 4 restarts, seeded) → (labels (N,) int64, centres (k, zdim)).

    `drgn analyze` and the `kmeans` filter both call this, so the same (run, k, seed) gives the same
    cluster ids in both: a user can read ids off the analysis plots and remove them in a filter spec.
    It runs on one thread: scikit-learn's multi-threaded Lloyd sums in a thread-dependent order, which
    changes the result (analyze and filter may run on nodes with different core counts), and on shared
    cores its OpenMP threads were 10× slower than one thread. 10⁶ × 10-D with k = 20 takes ~25 s.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    if not 1 <= k <= len(z):
        raise InputError(f"k-means needs 1 <= k <= number of particles ({len(z)}), got k = {k}")
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.filterwarnings("ignore", message=".*Number of distinct clusters.*")
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(np.asarray(z, dtype=np.float32))
    return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)


def nearest_rows(z: np.ndarray, points: np.ndarray, chunk: int = 262_144) -> np.ndarray:
    """For each point, the row of z nearest to it (Euclidean): the 'on-data' version of the point.

    Chunked over z so 10⁶ particles never make an N×m distance matrix larger than `chunk`×m.
    """
    points = np.asarray(points, dtype=np.float64)
    best_d = np.full(len(points), np.inf)
    best_i = np.zeros(len(points), dtype=np.int64)
    pp = (points**2).sum(axis=1)
    for a in range(0, len(z), chunk):
        zc = np.asarray(z[a:a + chunk], dtype=np.float64)
        d = (zc**2).sum(axis=1)[:, None] - 2.0 * zc @ points.T + pp[None, :]
        i = np.argmin(d, axis=0)
        di = d[i, np.arange(len(points))]
        better = di < best_d
        best_d[better], best_i[better] = di[better], i[better] + a
    return best_i


# ---- points in latent space for volumes -----------------------------------------------------------------
def pc_traversal(z: np.ndarray, pca: PCA, pc: int, n: int = 10,
                 percentiles: tuple[float, float] = PC_PERCENTILES) -> tuple[np.ndarray, np.ndarray]:
    """Points z = mean + t·PC for n values of t evenly spaced between two percentiles of the particles'
    coordinates along that PC (`pc` is 0-based) → (z points (n, zdim), t (n,)). As in the paper's Fig. 6d."""
    coord = (np.asarray(z, dtype=np.float64) - pca.mean) @ pca.components[pc]
    lo, hi = np.percentile(coord, percentiles)
    t = np.linspace(lo, hi, n)
    return (pca.mean[None, :] + t[:, None] * pca.components[pc][None, :]).astype(np.float32), t


def percentile_points(z: np.ndarray, percentiles=ZDIM1_PERCENTILES) -> np.ndarray:
    """(len(percentiles), 1) values of a 1-D latent at the given percentiles (the paper's Fig. 3c)."""
    return np.percentile(np.asarray(z)[:, 0], percentiles).astype(np.float32)[:, None]


def load_labels(path: str | os.PathLike, indices: np.ndarray) -> np.ndarray:
    """Labels for the run's particles from a file aligned to canonical table rows.

    `.npy` (integers or strings, no pickles) or text (one label per line, any token). Row r of the file
    labels table row r, so the run's particles get labels[indices].
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such labels file", path)
    if path.suffix == ".npy":
        labels = read_npy(path)
        if labels.ndim != 1:
            raise InputError(f"expected a 1-D array of labels, got shape {labels.shape}", path)
    else:
        try:
            lines = path.read_text().split("\n")
        except UnicodeDecodeError:
            raise InputError("is neither .npy nor a text file of one label per line", path) from None
        while lines and not lines[-1].strip():
            lines.pop()
        labels = np.array([s.strip() for s in lines])
        if any(s == "" for s in labels):
            raise InputError(f"line {int(np.argmax(labels == '')) + 1} is empty; give one label per line",
                             path)
    if len(indices) and len(labels) <= indices.max():
        raise InputError(f"has {len(labels)} labels but the run uses table row {int(indices.max())}; labels "
                         "must be aligned to the canonical table's rows", path)
    return labels[indices]


def label_means(z: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean latent of each label, ẑ_M = (1/|M|) Σ_{i∈M} z_i (the paper's 'on-data' class means)
    → (label values, means (m, zdim), counts)."""
    values, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sums = np.zeros((len(values), z.shape[1]), dtype=np.float64)
    np.add.at(sums, inv, z)
    return values, (sums / counts[:, None]).astype(np.float32), counts


# ---- the whole analysis ---------------------------------------------------------------------------------
@dataclass
class AnalyzeOptions:
    ksample: int = 20
    n_pcs: int = 2
    pc_points: int = 10
    seed: int = 0
    skip_volumes: bool = False
    skip_umap: bool = False
    umap_max_fit: int = UMAP_MAX_FIT
    labels: str | None = None
    D: int | None = None
    device: str = "auto"


def check_outdir(outdir: Path, inputs: list[Path]) -> None:
    """The output folder is replaced whole, so it must not be, or contain, any input."""
    out = outdir.resolve()
    for p in inputs:
        p = p.resolve()
        if p == out or out in p.parents:
            raise InputError(f"output folder would replace the input {p}; choose another output folder",
                             outdir)


def analyze(run_dir: str | os.PathLike, outdir: str | os.PathLike, opts: AnalyzeOptions) -> dict:
    """Run the full analysis of one training run into `outdir` (written atomically) → summary dict."""
    from drgn_core import plots
    from drgn_core.io.atomic import atomic_dir

    run = load_run(run_dir)
    outdir = Path(outdir)
    inputs = [run.run_dir] + ([Path(opts.labels)] if opts.labels else [])
    check_outdir(outdir, inputs)
    if opts.n_pcs < 0 or opts.pc_points < 2 or opts.ksample < 1:
        raise InputError(f"need --pc >= 0, --pc-points >= 2 and --ksample >= 1 (got {opts.n_pcs}, "
                         f"{opts.pc_points}, {opts.ksample})")
    labels = load_labels(opts.labels, run.indices) if opts.labels else None
    k = min(opts.ksample, run.n)
    z = run.z
    held = held_out_mask(run.run_dir, run.indices)
    n_held = int(held.sum()) if held is not None else 0  # the command tells the user (drgn analyze)
    summary: dict = {"run": str(run.run_dir), "n_particles": run.n, "n_held_out": n_held, "zdim": run.zdim,
                     "seed": opts.seed, "volumes": not opts.skip_volumes, "outputs": {}}

    with atomic_dir(outdir) as tmp:
        def vols(points: np.ndarray, sub: str) -> None:
            """Volumes at `points` into tmp/sub (or, with --skip-volumes, just their z_values.txt)."""
            if opts.skip_volumes:
                (tmp / sub).mkdir(exist_ok=True)
                np.savetxt(tmp / sub / "z_values.txt", points, fmt="%.8g",
                           header="latent value of each volume (not generated: --skip-volumes)")
            else:
                write_volumes(run.run_dir, points, tmp / sub, D=opts.D, device=opts.device)
            summary["outputs"].setdefault("volume_folders", []).append(sub)

        # PCA
        pca = fit_pca(z)
        pc = pca.transform(z)
        np.save(tmp / "pca.npy", pc)
        summary["pca"] = pca.to_dict()
        plots.explained_variance(pca.explained_variance_ratio, tmp / "pca_explained_variance.png")
        if run.zdim == 1:
            plots.histogram(z[:, 0], tmp / "z_hist.png", xlabel="z", title=f"{run.n} particles",
                            vlines=percentile_points(z)[:, 0])
        else:
            ev = pca.explained_variance_ratio
            lab = (f"PC1 ({100 * ev[0]:.1f}%)", f"PC2 ({100 * ev[1]:.1f}%)")
            for kind in ("scatter", "hexbin"):
                plots.latent_2d(pc[:, :2], tmp / f"pca_{kind}.png", kind, *lab, seed=opts.seed)
            if run.zdim == 2:
                for kind in ("scatter", "hexbin"):
                    plots.latent_2d(z, tmp / f"z_{kind}.png", kind, "z1", "z2", seed=opts.seed)

        # UMAP (meaningful only above two dimensions: below, the latent itself is the plot)
        emb = None
        if run.zdim > 2 and not opts.skip_umap and run.n > UMAP_NEIGHBORS + 1:
            um = run_umap(z, seed=opts.seed, max_fit=opts.umap_max_fit)
            emb = um.embedding
            np.save(tmp / "umap.npy", emb)
            summary["umap"] = um.info
            for kind in ("scatter", "hexbin"):
                plots.latent_2d(emb, tmp / f"umap_{kind}.png", kind, "UMAP1", "UMAP2", seed=opts.seed)
        else:
            reason = ("--skip-umap" if opts.skip_umap else f"zdim = {run.zdim} <= 2" if run.zdim <= 2
                      else f"{run.n} particles are too few for {UMAP_NEIGHBORS} neighbours")
            summary["umap"] = {"computed": False, "reason": reason}

        # k-means with on-data centres
        labels_k, centres = kmeans(z, k, seed=opts.seed)
        on_data = nearest_rows(z, centres)
        kdir = tmp / f"kmeans{k}"
        kdir.mkdir()
        np.save(kdir / "labels.npy", labels_k)
        np.savetxt(kdir / "centers.txt", z[on_data], fmt="%.6g")
        write_index_files(run.indices[on_data], kdir / "centers_ind.npy")
        counts = np.bincount(labels_k, minlength=k)
        summary["kmeans"] = {"k": k, "folder": f"kmeans{k}", "counts": counts.tolist(),
                             "centers_ind": run.indices[on_data].tolist(), "centers_z": z[on_data].tolist()}
        ids = [str(i) for i in range(k)]
        if run.zdim == 1:
            plots.histogram(z[:, 0], kdir / "z_hist_centers.png", vlines=z[on_data, 0],
                            title=f"k-means k={k}")
        else:
            plots.latent_2d(pc[:, :2], kdir / "pca_centers.png", "hexbin", "PC1", "PC2",
                            points=pc[on_data, :2], point_labels=ids)
            plots.categories_2d(pc[:, :2], labels_k, kdir / "pca_clusters.png", "PC1", "PC2",
                                label_centres=True, seed=opts.seed)
            if emb is not None:
                plots.latent_2d(emb, kdir / "umap_centers.png", "hexbin", "UMAP1", "UMAP2",
                                points=emb[on_data], point_labels=ids)
                plots.categories_2d(emb, labels_k, kdir / "umap_clusters.png", "UMAP1", "UMAP2",
                                    label_centres=True, seed=opts.seed)
        vols(z[on_data], f"kmeans{k}")

        # traversals along the first PCs
        summary["pc_traversals"] = []
        for i in range(min(opts.n_pcs, run.zdim)):
            pts, t = pc_traversal(z, pca, i, n=opts.pc_points)
            sub = f"pc{i + 1}"
            summary["pc_traversals"].append({"pc": i + 1, "folder": sub, "t": t.tolist(),
                                             "percentiles": list(PC_PERCENTILES)})
            vols(pts, sub)

        # a 1-D latent: the paper's percentile points
        if run.zdim == 1:
            pts = percentile_points(z)
            summary["percentiles"] = {"percentiles": list(ZDIM1_PERCENTILES), "z": pts[:, 0].tolist(),
                                      "folder": "percentiles"}
            vols(pts, "percentiles")

        # mean latent of each given label (e.g. published 3D classes)
        if labels is not None:
            values, means, cnt = label_means(z, labels)
            (tmp / "labels").mkdir()
            with open(tmp / "labels" / "labels.txt", "w") as f:
                f.write("# volume label count\n")
                for j, (v, c) in enumerate(zip(values, cnt)):
                    f.write(f"{j:03d} {v} {int(c)}\n")
            summary["labels"] = {"file": str(opts.labels), "values": [str(v) for v in values],
                                 "counts": cnt.tolist(), "folder": "labels"}
            if run.zdim > 1:
                xy = emb if emb is not None else pc[:, :2]
                names = ("UMAP1", "UMAP2") if emb is not None else ("PC1", "PC2")
                plots.categories_2d(xy, labels, tmp / "labels" / "labels.png", *names, seed=opts.seed)
            vols(means, "labels")

        summary["outputs"]["plots"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*.png"))
        with open(tmp / "summary.json", "w") as f:
            json.dump(summary, f, indent=1)
    return summary
