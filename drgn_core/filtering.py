"""Declarative, reproducible particle filters on latent spaces (`drgn filter`).

The paper removes impurities with rules on pilot runs' latents — z <= -1 for a 1-D latent, the outlier
component of a 5-component GMM for a 10-D latent — and keeps the intersection of both pilots' kept sets.
Here such a decision is a YAML spec, so it can be rerun, reviewed and versioned:

    combine: intersection            # across runs: intersection | union of the KEPT sets
    runs:
      - run: results/pilot/z1
        filters:
          - threshold: {dim: 0, op: '<=', value: -1}     # removes particles with z[0] <= -1
      - run: results/pilot/z10
        combine: intersection        # across this run's filters (same meaning), the default
        filters:
          - gmm: {components: 5, covariance: full, seed: 0, remove: {rule: largest_mean_norm, n: 1}}

A spec may also be just the list under `runs:`. Run paths are relative to the working directory, like
every other path on the command line.

Filters (each names the particles it REMOVES; parameters, types and defaults are the table in
drgn_core.filter_vocab, shared with the workflow config's schema and `drgn check-config`):

- threshold {dim = 0, op (<=, >=, <, >) = <=, value}: z[:, dim] op value.
- gmm {components = 5, covariance = full, seed = 0, remove: {ids: [...]} | {rule: largest_mean_norm, n = 1}}:
  a Gaussian mixture on z; removes the listed components, or the n components whose members have the
  largest mean ‖z‖ (the paper's outlier cluster, found there "by visualizing the magnitude of the latent
  encodings"), or with {rule: outlying_mean_norm, factor = 2} every component whose mean ‖z‖ exceeds
  factor × the median ‖z‖ of all particles (never the most populous component). The latter needs no count:
  junk of several kinds forms as many far-out components as it has kinds, and that number is rarely known,
  while a fixed n either leaves a junk component in or takes a particle component out.
  Both rules remove their components only when those are separated from the rest (`remove.separation`,
  default 2): the ‖z‖ of the outer shell of components they would remove must stand apart from the other
  particles' by Ashman's D >= 2 (`shell_cut`; docs/architecture.md § Outlier removal needs a separation).
  A mixture always has a component of largest mean ‖z‖, junk or not: without the test, a set without junk
  loses a fifth of its particles. separation: 0 restores the literal rule.
  Component ids are the fitted model's, reported in filter.json and drawn on filter.png, with the
  separation of every allowed shell and the decision.
- kmeans {k = 20, seed = 0, remove_ids: [...], separation}: `drgn_core.analysis.kmeans`, the same clustering
  (same ids) as `drgn analyze` with the same k and seed, so ids read off an analysis can be removed here.
  With separation (and remove_ids or not), only the clusters (among those listed) forming a shell
  separated by Ashman's D >= separation are removed, as for the gmm rules.
- norm {k_std = 3}: ‖z‖ > mean(‖z‖) + k_std·std(‖z‖).
- box {space: pca | umap = pca, xmin, xmax, ymin, ymax (any subset), keep: inside | outside = inside,
  umap: path/to/umap.npy (optional), seed = 0}: a rectangle in the PC1/PC2 plane (the same PCA as
  `drgn analyze`) or in UMAP coordinates — read from an analysis folder's umap.npy when `umap` is
  given (rows aligned with the run's z), else computed with `drgn_core.analysis.run_umap(seed)`.
- selection {path: FILE, keep: inside | outside = inside}: a saved index file (0-based canonical table
  rows, `.npy` or `.txt`, read by drgn_core.io.indices) — e.g. particles picked by hand in the explorer.
  inside keeps only the run's particles in the file; outside removes them. Its path is relative to the
  working directory, and the workflow declares it as an input, so editing the selection reruns the filter.
- abinit_confidence {min, run: ABINIT_RUN (optional)}: confidence < min, the per-particle pose confidence
  of a drgn abinit run (its confidence.npy, rows = its indices.npy), looked up by canonical row; the abinit
  run is `run`, else the one recorded in the filtered run's table (the poses.star it was trained on).

Combination. Within a run, "intersection" keeps a particle only if every filter keeps it, "union" if any
does. Across runs the sets are canonical table rows (each run's z rows map through its indices.npy):
kept = ∩ (or ∪) of the runs' kept sets, and removed = (∪ of the runs' rows) − kept. Literal set algebra:
with runs trained on different subsets, an intersection also drops rows that some run never saw, which
is what a run trained on an already-filtered subset means.

Everything random takes a seed recorded in filter.json; the same spec and inputs give identical outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError
from drgn_core.filter_vocab import BOX_BOUNDS, FILTERS, VocabError, check_filter
from drgn_core.io.indices import read_index_file, write_index_files

OPS = {"<=": np.less_equal, ">=": np.greater_equal, "<": np.less, ">": np.greater}  # threshold's `op`
COMBINE = ("intersection", "union")


# ---- the spec ---------------------------------------------------------------------------------------------
@dataclass
class FilterSpec:
    kind: str
    params: dict


@dataclass
class RunSpec:
    run: Path
    filters: list[FilterSpec]
    combine: str = "intersection"


@dataclass
class Spec:
    runs: list[RunSpec]
    combine: str = "intersection"
    source: str | None = None

    def to_dict(self) -> dict:
        return {"combine": self.combine,
                "runs": [{"run": str(r.run), "combine": r.combine,
                          "filters": [{f.kind: f.params} for f in r.filters]} for r in self.runs]}


def _err(msg: str, where: str, path) -> InputError:
    return InputError(f"{where}: {msg}", path)


def _check_filter(entry, where: str, path) -> FilterSpec:
    """Validate one filter entry ({kind: {params}}) against the vocabulary table and fill in defaults."""
    try:
        kind, params = check_filter(entry)
    except VocabError as e:
        kind = next(iter(entry)) if isinstance(entry, dict) and len(entry) == 1 else None
        inside = f"{where} ({kind})" if kind in FILTERS and "unknown filter" not in str(e) else where
        raise _err(str(e), inside, path) from None
    return FilterSpec(kind, params)


def _check_combine(v, where: str, path) -> str:
    if v not in COMBINE:
        raise _err(f"'combine' must be intersection or union, got {v!r}", where, path)
    return v


def parse_spec(data, source: str | os.PathLike | None = None) -> Spec:
    """Validate a spec (already parsed YAML/dict) → Spec. Every error names the place in the spec."""
    path = source
    if isinstance(data, list):
        data = {"runs": data}
    if not isinstance(data, dict):
        raise InputError("a filter spec is a list of runs, or a mapping with 'runs' (and 'combine')", path)
    unknown = [k for k in data if k not in ("runs", "combine")]
    if unknown:
        raise InputError(f"unknown key '{unknown[0]}' at the top of the spec (known: runs, combine)", path)
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise InputError("the spec lists no runs (expected 'runs: [{run: DIR, filters: [...]}, ...]')", path)
    out = []
    for i, r in enumerate(runs):
        where = f"run {i + 1}"
        if not isinstance(r, dict):
            raise _err(f"expected a mapping with 'run' and 'filters', got {r!r}", where, path)
        unknown = [k for k in r if k not in ("run", "filters", "combine")]
        if unknown:
            raise _err(f"unknown key '{unknown[0]}' (known: run, filters, combine)", where, path)
        if not isinstance(r.get("run"), str | os.PathLike):
            raise _err("missing 'run: DIR' (a drgn train run directory)", where, path)
        filters = r.get("filters")
        if not isinstance(filters, list) or not filters:
            raise _err("missing 'filters' (a non-empty list)", where, path)
        fs = [_check_filter(f, f"{where}, filter {j + 1}", path) for j, f in enumerate(filters)]
        out.append(RunSpec(Path(r["run"]), fs, _check_combine(r.get("combine", "intersection"), where, path)))
    return Spec(out, _check_combine(data.get("combine", "intersection"), "spec", path),
                str(source) if source else None)


def read_spec(path: str | os.PathLike) -> Spec:
    """Read and validate a YAML filter spec file."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise InputError("no such filter spec file", path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"is not valid YAML ({str(e).splitlines()[0]})", path) from None
    return parse_spec(data, path)


# ---- applying filters -------------------------------------------------------------------------------------
@dataclass
class FilterResult:
    kind: str
    params: dict
    removed: np.ndarray                   # bool over the run's rows
    info: dict = field(default_factory=dict)
    plot_labels: np.ndarray | None = None  # cluster ids for the figure (gmm, kmeans)




def ashman_d(outer: np.ndarray, inner: np.ndarray) -> float:
    """Ashman's D between two samples, signed (positive when `outer` lies above `inner`):
    D = √2 · (μ_outer − μ_inner) / √(σ²_outer + σ²_inner).

    Ashman, Bird & Zepf (1994, AJ 108:2348) show that a mixture of two Gaussians needs D > 2 for a clean
    separation of its modes; below that the "two groups" are one skewed or broad group. That is the question
    the outlier rules must answer before removing anything, so it is the statistic they use.
    """
    va, vb = float(np.var(outer)), float(np.var(inner))
    diff = float(np.mean(outer)) - float(np.mean(inner))
    if va + vb == 0:
        return float("inf") if diff > 0 else (0.0 if diff == 0 else float("-inf"))
    return float(np.sqrt(2.0) * diff / np.sqrt(va + vb))


def shell_cut(norms: np.ndarray, labels: np.ndarray, n_groups: int, candidates: set[int],
              threshold: float) -> tuple[list[int], dict]:
    """The outer shell of groups (components or clusters) to remove, and the figures behind the decision.

    Groups are ordered by the mean ‖z‖ of their members. Each cut of that order splits the particles into an
    inner core and an outer shell; a cut is allowed when every group of its shell is a candidate (what the
    rule would remove: its top n, the far-out ones, the listed ids) and the most populous group stays in the
    core. The largest allowed shell whose ‖z‖ stands apart from the core's by Ashman's D >= `threshold`
    (`ashman_d`) is removed (as much as is separated, so junk of several kinds goes together); when no
    allowed shell reaches it, nothing is removed. So a set without
    junk, whose components merely tile one blob of latents, loses nothing (its best D stays well under 2),
    while junk, which the encoder places far from the particles, forms a shell with D far above 2. With
    threshold 0 every candidate is removed, whatever the separation (the paper's literal rule).
    """
    counts = np.bincount(labels, minlength=n_groups)
    if threshold <= 0:
        return sorted(candidates), {"separation_threshold": threshold}
    mean_norm = np.array([norms[labels == c].mean() if counts[c] else -np.inf for c in range(n_groups)])
    order = [int(c) for c in np.argsort(mean_norm, kind="stable") if counts[c]]
    biggest = int(np.argmax(counts))
    cuts = []
    for k in range(1, len(order)):
        shell = order[k:]
        if biggest in shell or not set(shell) <= candidates:
            continue
        m = np.isin(labels, shell)
        cuts.append((ashman_d(norms[m], norms[~m]), sorted(shell)))
    separated = [c for c in cuts if c[0] >= threshold]
    # cuts run from the largest shell to the smallest: the first separated one is the largest
    best = separated[0] if separated else max(cuts, key=lambda c: c[0], default=(None, []))
    removed = best[1] if separated else []
    info = {"separation_threshold": threshold,
            "best_separation": None if best[0] is None else round(best[0], 4),
            "best_shell": best[1],
            "separations": [{"shell": shell, "ashman_d": round(d, 4)} for d, shell in cuts]}
    return removed, info


def _gmm(z: np.ndarray, p: dict) -> FilterResult:
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    if p["components"] > len(z):
        raise InputError(f"gmm: {p['components']} components for {len(z)} particles")
    g = GaussianMixture(n_components=p["components"], covariance_type=p["covariance"], random_state=p["seed"],
                        n_init=1, max_iter=500, reg_covar=1e-5)
    with threadpool_limits(1):  # one thread: the fit (and its k-means start) never depends on core count
        labels = g.fit(z).predict(z)
    norms = np.linalg.norm(z.astype(np.float64), axis=1)
    counts = np.bincount(labels, minlength=p["components"])
    mean_norm = np.array([norms[labels == c].mean() if counts[c] else -np.inf
                          for c in range(p["components"])])
    extra: dict = {}
    if "ids" in p["remove"]:
        ids = p["remove"]["ids"]
    else:
        if p["remove"]["rule"] == "largest_mean_norm":
            cand = set(np.argsort(-mean_norm, kind="stable")[:p["remove"]["n"]].tolist())
        else:  # outlying_mean_norm: as many components as lie far out, never the most populous one
            limit = p["remove"]["factor"] * float(np.median(norms))
            cand = {c for c in range(p["components"]) if mean_norm[c] > limit and c != int(np.argmax(counts))}
            extra = {"mean_norm_limit": limit}
        ids, sep = shell_cut(norms, labels, p["components"], cand, p["remove"]["separation"])
        extra.update(candidates=sorted(int(c) for c in cand), **sep)
    info = {**extra, "component_counts": counts.tolist(),
            "component_mean_norm": [None if not np.isfinite(v) else float(v) for v in mean_norm],
            "removed_components": [int(i) for i in ids], "converged": bool(g.converged_)}
    return FilterResult("gmm", p, np.isin(labels, ids), info, labels)


def _kmeans(z: np.ndarray, p: dict) -> FilterResult:
    from drgn_core.analysis import kmeans

    labels, _ = kmeans(z, p["k"], seed=p["seed"])
    info: dict = {"cluster_counts": np.bincount(labels, minlength=p["k"]).tolist()}
    ids = p.get("remove_ids", list(range(p["k"])))
    if "separation" in p:
        norms = np.linalg.norm(z.astype(np.float64), axis=1)
        ids, sep = shell_cut(norms, labels, p["k"], set(ids), p["separation"])
        info.update(sep)
    info["removed_clusters"] = [int(i) for i in ids]
    return FilterResult("kmeans", p, np.isin(labels, ids), info, labels)


def _box_coords(z: np.ndarray, p: dict, run: Path) -> np.ndarray:
    from drgn_core import analysis

    if p["space"] == "pca":
        pca = analysis.fit_pca(z)
        return pca.transform(z)[:, :2]
    if "umap" in p:
        f = Path(p["umap"])
        if not f.exists():
            raise InputError("no such UMAP file (box filter 'umap')", f)
        emb = np.load(f, allow_pickle=False)
        if emb.shape != (len(z), 2):
            raise InputError(f"has shape {emb.shape}, but run {run} has {len(z)} particles: expected "
                             f"({len(z)}, 2) aligned with its z.npy", f)
        return emb
    return analysis.run_umap(z, seed=p["seed"]).embedding


def _box(z: np.ndarray, p: dict, run: Path) -> FilterResult:
    xy = _box_coords(z, p, run)
    if xy.shape[1] < 2 and ("ymin" in p or "ymax" in p):
        raise InputError(f"box filter: run {run} has a 1-D latent, so the box can only bound x (PC1)")
    inside = np.ones(len(z), dtype=bool)
    for b in BOX_BOUNDS:
        if b in p:
            col = xy[:, 0 if b[0] == "x" else 1]
            inside &= col >= p[b] if b.endswith("min") else col <= p[b]
    removed = ~inside if p["keep"] == "inside" else inside
    return FilterResult("box", p, removed, {"inside": int(inside.sum())})


def _selection(indices: np.ndarray, p: dict) -> FilterResult:
    """A saved selection (canonical rows, e.g. hand-picked in the explorer): keep only it, or remove it.

    Rows of the file that the run did not train on select nothing; the count is reported so a selection
    made on another dataset shows up as "0 of the run's particles selected".
    """
    rows = read_index_file(p["path"])
    selected = np.isin(indices, rows)
    removed = ~selected if p["keep"] == "inside" else selected
    return FilterResult("selection", p, removed, {"selection_rows": int(rows.size),
                                                  "selected_in_run": int(selected.sum())})


def abinit_run_of(run: Path) -> Path:
    """The drgn abinit run whose poses.star the training run `run` read (its config.yaml's inputs.table,
    whose provenance names the abinit run)."""
    from drgn_core.io.table import read_table
    from drgn_core.train import read_run_config

    table_path = (read_run_config(Path(run)).get("inputs") or {}).get("table")
    recorded = read_table(table_path).provenance.get("abinit_run") if table_path else None
    if recorded in (None, "", "nan"):
        raise InputError("abinit_confidence filter: the run was not trained on the poses of a drgn abinit "
                         f"run (its table {table_path} records none); give the abinit run as `run`", run)
    return Path(str(recorded))


def _abinit_confidence(indices: np.ndarray, p: dict, run: Path) -> FilterResult:
    """Pose confidence below `min` (ab initio runs only): looked up by canonical row, so a run trained on a
    subset of the abinit run's particles is filtered by those particles' own confidences."""
    from drgn_core.rundir import read_npy

    ab = Path(p["run"]) if "run" in p else abinit_run_of(run)
    rows = read_index_file(ab / "indices.npy")
    conf = read_npy(ab / "confidence.npy", len(rows), "confidence.npy against indices.npy")
    pos = np.searchsorted(rows, indices) if np.all(np.diff(rows) > 0) else None
    if pos is None or np.any(pos >= len(rows)) or np.any(rows[np.minimum(pos, len(rows) - 1)] != indices):
        lookup = {int(r): i for i, r in enumerate(rows)}
        missing = [int(r) for r in indices if int(r) not in lookup]
        if missing:
            raise InputError(f"abinit_confidence filter: {len(missing)} of the run's particles (e.g. row "
                             f"{missing[0]}) have no confidence in this abinit run", ab)
        pos = np.array([lookup[int(r)] for r in indices], dtype=np.int64)
    c = conf[pos].astype(np.float64)
    return FilterResult("abinit_confidence", p, c < p["min"],
                        {"abinit_run": str(ab), "median_confidence": float(np.median(c))})


def apply_filter(z: np.ndarray, f: FilterSpec, run: Path, indices: np.ndarray | None = None) -> FilterResult:
    """Evaluate one validated filter on a run's latents → which rows it removes.

    `indices` are the canonical rows of z (the run's indices.npy; 0..N-1 when not given), which the
    selection filter matches its index file against.
    """
    p = f.params
    if f.kind == "selection":
        return _selection(np.arange(len(z)) if indices is None else indices, p)
    if f.kind == "abinit_confidence":
        return _abinit_confidence(np.arange(len(z)) if indices is None else indices, p, run)
    if f.kind == "threshold":
        if not 0 <= p["dim"] < z.shape[1]:
            raise InputError(f"threshold filter: dim {p['dim']} is out of range for run {run} with zdim "
                             f"{z.shape[1]} (dims are 0-based)")
        return FilterResult("threshold", p, OPS[p["op"]](z[:, p["dim"]], p["value"]))
    if f.kind == "gmm":
        return _gmm(z, p)
    if f.kind == "kmeans":
        return _kmeans(z, p)
    if f.kind == "norm":
        norms = np.linalg.norm(z.astype(np.float64), axis=1)
        cut = norms.mean() + p["k_std"] * norms.std()
        return FilterResult("norm", p, norms > cut, {"norm_cutoff": float(cut)})
    return _box(z, p, run)


@dataclass
class RunOutcome:
    spec: RunSpec
    indices: np.ndarray          # canonical rows of the run's z
    z: np.ndarray
    results: list[FilterResult]
    removed: np.ndarray          # bool over the run's rows, filters combined

    @property
    def kept_rows(self) -> np.ndarray:
        return np.sort(self.indices[~self.removed])


def run_filters(rs: RunSpec) -> RunOutcome:
    from drgn_core.rundir import load_run

    run = load_run(rs.run)
    results = [apply_filter(run.z, f, rs.run, run.indices) for f in rs.filters]
    masks = np.stack([r.removed for r in results])
    # intersection of kept sets = union of removed sets; union of kept sets = intersection of removed sets
    removed = masks.any(axis=0) if rs.combine == "intersection" else masks.all(axis=0)
    return RunOutcome(rs, run.indices, run.z, results, removed)


def combine_runs(outcomes: list[RunOutcome], how: str) -> tuple[np.ndarray, np.ndarray]:
    """(kept, removed) canonical rows, sorted int64, from the runs' kept sets (see module docstring)."""
    universe = np.unique(np.concatenate([o.indices for o in outcomes]))
    kept = outcomes[0].kept_rows
    for o in outcomes[1:]:
        kept = (np.intersect1d if how == "intersection" else np.union1d)(kept, o.kept_rows)
    removed = np.setdiff1d(universe, kept, assume_unique=True)
    return kept.astype(np.int64), removed.astype(np.int64)


def junk_scores(removed: np.ndarray, universe: np.ndarray, junk: np.ndarray) -> dict:
    """Precision, recall and F1 of the removed set against injected junk (docs/architecture.md § Metrics on
    simulated data), over the rows the runs covered. `junk` is the table's drgnGtJunk column (all rows)."""
    is_junk = np.asarray(junk).astype(float) > 0
    truth = set(universe[is_junk[universe]].tolist())
    rem = set(removed.tolist())
    tp = len(truth & rem)
    precision = tp / len(rem) if rem else (1.0 if not truth else 0.0)
    recall = tp / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "true_junk": len(truth), "removed": len(rem),
            "true_positives": tp}


# ---- the command ------------------------------------------------------------------------------------------
def _plot(outcomes: list[RunOutcome], kept: np.ndarray, path: Path, seed: int) -> None:
    """One row per run: kept/removed (final decision) on its latent plot, then each clustering filter's
    ids (so ids to remove can be read off)."""
    from drgn_core import analysis, plots

    plt = plots._pyplot()
    ncols = 1 + max(sum(r.plot_labels is not None for r in o.results) for o in outcomes)
    fig, axes = plt.subplots(len(outcomes), ncols, figsize=(5.2 * ncols, 4.4 * len(outcomes)), squeeze=False)
    kept_set = np.zeros(int(max(o.indices.max() for o in outcomes)) + 1, dtype=bool)
    kept_set[kept] = True
    for r, o in enumerate(outcomes):
        status = kept_set[o.indices]
        ax = axes[r, 0]
        title = f"{o.spec.run.name}: kept {int(status.sum())}, removed {int((~status).sum())}"
        if o.z.shape[1] == 1:
            bins = np.histogram_bin_edges(o.z[:, 0], bins=100)
            ax.hist([o.z[status, 0], o.z[~status, 0]], bins=bins, stacked=True, label=["kept", "removed"],
                    color=["tab:blue", "tab:red"])
            ax.set_xlabel("z")
            xy = None
        else:
            xy = o.z if o.z.shape[1] == 2 else analysis.fit_pca(o.z).transform(o.z)[:, :2]
            sel = plots.subsample(len(xy), seed=seed)
            for m, c, lab in ((status[sel], "tab:blue", "kept"), (~status[sel], "tab:red", "removed")):
                ax.scatter(xy[sel][m, 0], xy[sel][m, 1], s=2, color=c, label=lab, linewidths=0,
                           rasterized=True)
            ax.set_xlabel("z1" if o.z.shape[1] == 2 else "PC1")
            ax.set_ylabel("z2" if o.z.shape[1] == 2 else "PC2")
        ax.legend(markerscale=4)
        ax.set_title(title, fontsize=9)
        col = 1
        for res in o.results:
            if res.plot_labels is None:
                continue
            ax = axes[r, col]
            col += 1
            if xy is None:
                vals = np.unique(res.plot_labels)
                ax.hist([o.z[res.plot_labels == v, 0] for v in vals], bins=100, stacked=True,
                        label=[str(v) for v in vals])
                ax.set_xlabel("z")
            else:
                sel = plots.subsample(len(xy), seed=seed)
                cmap = plt.get_cmap("tab20")
                for v in np.unique(res.plot_labels):
                    m = res.plot_labels[sel] == v
                    ax.scatter(xy[sel][m, 0], xy[sel][m, 1], s=2, color=cmap(int(v) % 20), linewidths=0,
                               rasterized=True)
                    cx, cy = np.median(xy[res.plot_labels == v], axis=0)
                    ax.annotate(str(v), (cx, cy), weight="bold", ha="center")
            gone = res.info.get("removed_components", res.info.get("removed_clusters"))
            sep = ""
            if res.info.get("best_separation") is not None:
                sep = (f"\nbest shell {res.info['best_shell']}: Ashman's D {res.info['best_separation']:.2f} "
                       f"(removed if >= {res.info['separation_threshold']:g})")
            ax.set_title(f"{res.kind} ids (removed: {gone}){sep}", fontsize=9)
        for c in range(col, ncols):
            axes[r, c].axis("off")
    plots.save(fig, path)


def run_filter_spec(spec: Spec, outdir: str | os.PathLike, table_path: str | os.PathLike | None = None,
                    plot_seed: int = 0) -> dict:
    """Apply a validated spec and write kept/removed indices, filter.json and filter.png atomically."""
    from drgn_core.io.atomic import atomic_dir

    outdir = Path(outdir)
    for rs in spec.runs:
        rr, oo = rs.run.resolve(), outdir.resolve()
        if rr == oo or oo in rr.parents:
            raise InputError(f"output folder would replace the input run {rs.run}; choose another", outdir)
    outcomes = [run_filters(rs) for rs in spec.runs]
    kept, removed = combine_runs(outcomes, spec.combine)
    universe = np.union1d(kept, removed)
    report: dict = {"spec": spec.to_dict(), "spec_file": spec.source, "runs": [], "combined": {
        "how": spec.combine, "particles": len(universe), "kept": len(kept),
        "removed": len(removed)}}
    for o in outcomes:
        report["runs"].append({
            "run": str(o.spec.run), "particles": len(o.indices), "zdim": int(o.z.shape[1]),
            "combine": o.spec.combine,
            "filters": [{"filter": r.kind, "params": r.params, "removed": int(r.removed.sum()), **r.info}
                        for r in o.results],
            "removed": int(o.removed.sum()), "kept": int((~o.removed).sum())})
    if table_path is not None:
        from drgn_core.io.table import read_table

        table = read_table(table_path)
        if len(universe) and universe.max() >= len(table):
            raise InputError(f"has {len(table)} rows but the runs use row {int(universe.max())}: is it the "
                             "table the runs were trained from?", table_path)
        report["ground_truth"] = {"table": str(table_path),
                                  **junk_scores(removed, universe, table.gt("drgnGtJunk"))}
    with atomic_dir(outdir) as tmp:
        for name, rows in (("kept", kept), ("removed", removed)):
            write_index_files(rows, tmp / f"{name}.npy")
        with open(tmp / "filter.json", "w") as f:
            json.dump(report, f, indent=1)
        _plot(outcomes, kept, tmp / "filter.png", plot_seed)
    return report
