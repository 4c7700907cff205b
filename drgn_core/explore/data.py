"""Everything the explorer plots, per particle, held once in memory for all particles of a run.

A column is a float32 array aligned to the rows of the run's z.npy (position p is table row
indices[p]). Columns come from the latents (z1…zD, ‖z‖, PC1…), the analysis folder when there is one
(UMAP, k-means labels), the canonical table (pose angles, shifts, defocus, ground truth when simulated),
the filter's verdict, and the run's held-out rows. Selections, histograms and counts are computed over
these full columns; the browser only ever draws a fixed random subsample of them, so its speed does not
depend on N.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError
from drgn_core.explore import runlink

MAX_POINTS = 200_000     # points drawn in the browser; every computation still uses all particles
MAX_PCS = 10


@dataclass
class ExploreData:
    """One run's particles, columns and the files they came from."""

    run_dir: Path
    indices: np.ndarray                    # (N,) canonical table rows of the run's latents
    z: np.ndarray                          # (N, zdim) float32
    columns: dict[str, np.ndarray]         # name -> (N,) float32
    groups: dict[str, list[str]]           # "latent", "embedding", "table", ... -> column names
    sample: np.ndarray                     # (n_sample,) positions drawn in the browser, random order
    table: object | None = None            # ParticleTable, when the run's table could be read
    table_path: Path | None = None
    analysis_dir: Path | None = None
    filter_dir: Path | None = None
    kmeans_centres: np.ndarray | None = None   # (k, zdim) on-data centres, from the analysis
    kmeans_rows: np.ndarray | None = None      # positions of those centres
    landscape_dir: Path | None = None          # drgn landscape folder: the 'state' column and state maps
    n_states: int = 0
    sources: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.indices)

    @property
    def zdim(self) -> int:
        return int(self.z.shape[1])

    def column(self, name: str) -> np.ndarray:
        """A column by name, or a 400-worthy error naming the choices."""
        try:
            return self.columns[name]
        except KeyError:
            raise InputError(f"no column {name!r}; choose one of {', '.join(self.columns)}") from None

    def meta(self) -> dict:
        """What the page needs to build its menus: column names, groups, ranges, counts."""
        ranges = {}
        for k, v in self.columns.items():
            finite = v[np.isfinite(v)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            ranges[k] = [lo, hi]
        cat = [k for k in self.columns if k in ("state", "kmeans", "filter_kept", "held_out", "gt_state",
                                                "gt_junk", "gt_volume")]
        default_xy = (["UMAP1", "UMAP2"] if "UMAP1" in self.columns else ["PC1", "PC2"] if "PC2" in
                      self.columns else ["z1", "|z|"])
        return {"n": self.n, "zdim": self.zdim, "n_sample": len(self.sample), "columns": list(self.columns),
                "groups": self.groups, "ranges": ranges, "categorical": cat, "default_axes": default_xy,
                "default_colour": next((c for c in ("state", "kmeans") if c in self.columns), default_xy[0]),
                "run": str(self.run_dir), "table": str(self.table_path) if self.table_path else None,
                "analysis": str(self.analysis_dir) if self.analysis_dir else None,
                "has_images": self.table is not None, "can_export": self.table is not None,
                "n_kmeans": 0 if self.kmeans_centres is None else len(self.kmeans_centres),
                "n_states": self.n_states,
                "landscape": str(self.landscape_dir) if self.landscape_dir else None,
                "sources": self.sources}

    def positions_of_rows(self, rows: np.ndarray, what: str) -> np.ndarray:
        """Canonical table rows → positions in the run (error naming a row the run does not hold)."""
        order = np.argsort(self.indices, kind="stable")
        rows = np.asarray(rows, dtype=np.int64)
        at = np.searchsorted(self.indices, rows, sorter=order)
        at = np.minimum(at, self.n - 1)
        pos = order[at]
        bad = self.indices[pos] != rows
        if bad.any():
            raise InputError(f"{what}: table row {int(rows[bad][0])} is not among the run's {self.n} "
                             "particles")
        return pos


def _analysis_for(run_dir: Path, analysis: str | os.PathLike | None, name: str = "analyze") -> Path | None:
    """The analysis folder of the run: the one given, or `<name>/` beside the run (workflow layout:
    analyze/ for drgn analyze, landscape/ for drgn landscape), if its summary.json names this run."""
    if analysis is not None:
        a = Path(analysis)
        if not (a / "summary.json").exists():
            raise InputError(f"is not a drgn {name} folder (no summary.json)", a)
        return a
    guess = run_dir.parent / name
    if (guess / "summary.json").exists():
        try:
            recorded = json.loads((guess / "summary.json").read_text()).get("run", "")
        except (OSError, json.JSONDecodeError):
            return None
        if recorded and Path(recorded).resolve() == run_dir.resolve():
            return guess
        if recorded and not Path(recorded).is_absolute():
            # the workflow records the run relative to its working directory; accept the same run name
            if Path(recorded).name == run_dir.name:
                return guess
    return None


def _table_for(run_dir: Path, table: str | os.PathLike | None) -> Path | None:
    """The canonical table: the one given, else the one the run's config.yaml records (if it exists)."""
    if table is not None:
        p = Path(table)
        if not p.exists():
            raise InputError("no such particle table", p)
        return p
    if not (run_dir / "config.yaml").exists():
        return None
    recorded = (runlink.read_run_config(run_dir).get("inputs") or {}).get("table")
    return Path(recorded) if recorded and Path(recorded).exists() else None


def load_explore_data(run_dir: str | os.PathLike, analysis: str | os.PathLike | None = None,
                      table: str | os.PathLike | None = None, filter_dir: str | os.PathLike | None = None,
                      max_points: int = MAX_POINTS, seed: int = 0, log=print,
                      landscape: str | os.PathLike | None = None) -> ExploreData:
    """Read the run, its analysis, table and filter verdict into columns (see the module docstring)."""
    run = runlink.load_run(run_dir)
    run_dir = Path(run.run_dir)
    n, z = run.n, run.z
    cols: dict[str, np.ndarray] = {}
    groups: dict[str, list[str]] = {}
    sources: dict = {"run": str(run_dir)}

    def add(group: str, name: str, values: np.ndarray) -> None:
        cols[name] = np.ascontiguousarray(values, dtype=np.float32)
        groups.setdefault(group, []).append(name)

    # embeddings first: they are the default axes
    adir = _analysis_for(run_dir, analysis)
    km_centres = km_rows = None
    if adir is not None:
        sources["analysis"] = str(adir)
        if (adir / "umap.npy").exists():
            emb = runlink.read_npy(adir / "umap.npy", n, "UMAP embedding")
            add("embedding", "UMAP1", emb[:, 0])
            add("embedding", "UMAP2", emb[:, 1])
    if adir is not None and (adir / "pca.npy").exists():
        pc = runlink.read_npy(adir / "pca.npy", n, "PCA projection")
    else:
        pc = runlink.fit_pca(z).transform(z)
    for i in range(min(pc.shape[1], MAX_PCS)):
        add("embedding", f"PC{i + 1}", pc[:, i])
    for i in range(run.zdim):
        add("latent", f"z{i + 1}", z[:, i])
    add("latent", "|z|", np.linalg.norm(z, axis=1))
    if adir is not None:
        summary = json.loads((adir / "summary.json").read_text())
        km = summary.get("kmeans") or {}
        kfolder = adir / str(km.get("folder", ""))
        if km and (kfolder / "labels.npy").exists():
            add("analysis", "kmeans", runlink.read_npy(kfolder / "labels.npy", n, "k-means labels"))
            km_centres = np.asarray(km.get("centers_z"), dtype=np.float32).reshape(-1, run.zdim)
            try:
                order = np.argsort(run.indices)
                rows = np.asarray(km.get("centers_ind"), dtype=np.int64)
                km_rows = order[np.searchsorted(run.indices, rows, sorter=order)]
            except (IndexError, ValueError):
                km_rows = None

    # landscape states: drgn landscape's particle_states.npy, the one particle → state mapping
    ldir = _analysis_for(run_dir, landscape, "landscape")
    n_states = 0
    if ldir is not None:
        sources["landscape"] = str(ldir)
        states = runlink.read_npy(ldir / "particle_states.npy", n, "landscape states")
        add("landscape", "state", states)
        n_states = int(json.loads((ldir / "summary.json").read_text())["states"]["n_states"])
        if (ldir / "particle_vol_pca.npy").exists():
            vpc = runlink.read_npy(ldir / "particle_vol_pca.npy", n, "volume-PC coordinates")
            for i in range(min(vpc.shape[1], 3)):
                add("landscape", f"volPC{i + 1}", vpc[:, i])

    held = runlink.held_out_mask(run_dir, run.indices)
    if held is not None:
        add("run", "held_out", held)

    tpath = _table_for(run_dir, table)
    tab = None
    if tpath is not None:
        from drgn_core.io.table import read_table

        tab = read_table(tpath)
        if run.indices.max() >= len(tab):
            raise InputError(f"the run refers to table row {int(run.indices.max())} but the table has "
                             f"{len(tab)} rows: not the run's table", tpath)
        sources["table"] = str(tpath)
        p = tab.particles.iloc[run.indices]
        eul = p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64)
        for j, name in enumerate(("rot", "tilt", "psi")):
            add("table", name, eul[:, j])
        sh = p[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(dtype=np.float64)
        add("table", "shift_x_A", sh[:, 0])
        add("table", "shift_y_A", sh[:, 1])
        dfu = p["rlnDefocusU"].to_numpy(dtype=np.float64)
        dfv = p["rlnDefocusV"].to_numpy(dtype=np.float64)
        add("table", "defocus", (dfu + dfv) / 2)
        add("table", "astigmatism", np.abs(dfu - dfv))
        for c, name in (("drgnGtState", "gt_state"), ("drgnGtCoord", "gt_coord"), ("drgnGtJunk", "gt_junk"),
                        ("drgnGtVolume", "gt_volume")):
            if c in p:
                add("ground truth", name, p[c].to_numpy(dtype=np.float64))

    fdir = Path(filter_dir) if filter_dir is not None else None
    if fdir is None and (run_dir.parent.parent / "filter" / "kept.npy").exists():
        fdir = run_dir.parent.parent / "filter"
    if fdir is not None:
        from drgn_core.io.indices import read_index_file

        kept = read_index_file(fdir / "kept.npy")
        add("filter", "filter_kept", np.isin(run.indices, kept))
        sources["filter"] = str(fdir)

    rng = np.random.default_rng(seed)
    sample = rng.permutation(n)[:max_points] if n > max_points else rng.permutation(n)
    log(f"explore: {n} particles, {run.zdim}-D latent, {len(cols)} columns; drawing "
        f"{len(sample)} of them" + (f" (all computations use all {n})" if len(sample) < n else ""))
    return ExploreData(run_dir, run.indices, z, cols, groups, sample.astype(np.int64), tab, tpath, adir, fdir,
                       km_centres, km_rows, ldir, n_states, sources)


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
