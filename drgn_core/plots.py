"""Plots shared by analyze, filter, traverse and evaluate: latent spaces, and maps as contact sheets.

Every figure is drawn with matplotlib's non-interactive 'Agg' backend (the commands run on cluster nodes
with no display) and written atomically as PNG. Scatter plots of a million points are slow to draw and
unreadable anyway, so scatters draw a seeded random subsample of at most `MAX_SCATTER` points while
hexbins, histograms and marginals always use every point.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drgn_core.io.atomic import atomic_path

MAX_SCATTER = 50_000


def _pyplot():
    """pyplot with the Agg backend selected first (safe on headless nodes, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | os.PathLike) -> Path:
    """Write `fig` as PNG atomically and close it (figures are never reused)."""
    plt = _pyplot()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def subsample(n: int, max_points: int = MAX_SCATTER, seed: int = 0) -> np.ndarray:
    """Sorted rows of a seeded random subsample (all rows when n <= max_points)."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def _marginal_axes(plt, figsize=(6.4, 6.4)):
    """A figure with a main panel and histogram panels on its top and right edges."""
    fig = plt.figure(figsize=figsize)
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), wspace=0.05, hspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)
    top.tick_params(labelbottom=False, labelleft=False)   # marginals show shape; counts would clutter
    right.tick_params(labelleft=False, labelbottom=False)
    return fig, ax, top, right


def _annotate(ax, points: np.ndarray | None, labels: Sequence[str] | None) -> None:
    """Mark special points (k-means centres, anchors) with black dots and their labels."""
    if points is None or len(points) == 0:
        return
    ax.scatter(points[:, 0], points[:, 1], c="k", s=18, edgecolors="w", linewidths=0.5, zorder=3)
    for i, (x, y) in enumerate(points):
        ax.annotate(str(labels[i]) if labels is not None else str(i), (x, y), fontsize=7,
                    xytext=(3, 3), textcoords="offset points", zorder=4)


def latent_2d(xy: np.ndarray, path: str | os.PathLike, kind: str = "scatter", xlabel: str = "x",
              ylabel: str = "y", title: str | None = None, points: np.ndarray | None = None,
              point_labels: Sequence[str] | None = None, seed: int = 0) -> Path:
    """Scatter or hexbin of 2-D coordinates with marginal histograms (all points in the marginals)."""
    plt = _pyplot()
    fig, ax, top, right = _marginal_axes(plt)
    if kind == "hexbin":
        hb = ax.hexbin(xy[:, 0], xy[:, 1], gridsize=60, bins="log", cmap="viridis", mincnt=1)
        fig.colorbar(hb, ax=right, label="particles (log)", fraction=0.6)
    else:
        sel = subsample(len(xy), seed=seed)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=2, alpha=0.3 if len(sel) > 5000 else 0.7, linewidths=0,
                   rasterized=True)
    top.hist(xy[:, 0], bins=100, color="0.4")
    right.hist(xy[:, 1], bins=100, orientation="horizontal", color="0.4")
    _annotate(ax, points, point_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        top.set_title(title)
    return save(fig, path)


def histogram(values: np.ndarray, path: str | os.PathLike, xlabel: str = "z", title: str | None = None,
              vlines: Sequence[float] | None = None, groups: dict[str, np.ndarray] | None = None) -> Path:
    """Histogram of a 1-D latent (zdim = 1), optionally split into stacked groups (e.g. kept/removed)
    and with dotted vertical lines at marked values (percentile points, thresholds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bins = np.histogram_bin_edges(values, bins=100)
    if groups:
        ax.hist([values[m] for m in groups.values()], bins=bins, stacked=True, label=list(groups))
        ax.legend()
    else:
        ax.hist(values, bins=bins, color="0.4")
    for v in (() if vlines is None else vlines):
        ax.axvline(v, color="k", linestyle=":", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("particles")
    if title:
        ax.set_title(title)
    return save(fig, path)


def explained_variance(ratio: np.ndarray, path: str | os.PathLike) -> Path:
    """Bar chart of the PCA explained-variance ratio per component, with its running sum."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    pcs = np.arange(1, len(ratio) + 1)
    ax.bar(pcs, ratio, color="0.5", label="per PC")
    ax.plot(pcs, np.cumsum(ratio), "k.-", label="cumulative")
    ax.set_xticks(pcs)
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax.set_ylim(0, 1.02)
    ax.legend()
    return save(fig, path)


def categories_2d(xy: np.ndarray, categories: np.ndarray, path: str | os.PathLike, xlabel: str = "x",
                  ylabel: str = "y", title: str | None = None, names: dict | None = None,
                  label_centres: bool = False, seed: int = 0) -> Path:
    """Scatter coloured by a categorical value (cluster id, class label, kept/removed).

    With `label_centres` each category's id is written at the median of its points, so a user can read
    off which cluster ids to remove in a filter spec.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    sel = subsample(len(xy), seed=seed)
    values = np.unique(categories)
    cmap = plt.get_cmap("tab20" if len(values) > 10 else "tab10")
    for i, v in enumerate(values):
        m = categories[sel] == v
        name = names.get(v, str(v)) if names else str(v)
        ax.scatter(xy[sel][m, 0], xy[sel][m, 1], s=3, color=cmap(i % cmap.N), linewidths=0,
                   label=f"{name} ({int(np.sum(categories == v))})", rasterized=True)
        if label_centres and np.any(categories == v):
            cx, cy = np.median(xy[categories == v], axis=0)
            ax.annotate(name, (cx, cy), fontsize=9, weight="bold", ha="center", va="center")
    if len(values) <= 20:
        ax.legend(markerscale=4, fontsize=7, loc="best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return save(fig, path)


def path_2d(xy: np.ndarray, path_xy: np.ndarray, path: str | os.PathLike, xlabel: str = "x",
            ylabel: str = "y", anchors_xy: np.ndarray | None = None, title: str | None = None) -> Path:
    """A trajectory (graph path, PC line) drawn over the hexbin density of all particles."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    if len(xy):
        ax.hexbin(xy[:, 0], xy[:, 1], gridsize=60, bins="log", cmap="Greys", mincnt=1)
    ax.plot(path_xy[:, 0], path_xy[:, 1], "-", color="tab:red", linewidth=1.2)
    ax.scatter(path_xy[:, 0], path_xy[:, 1], c=np.arange(len(path_xy)), cmap="viridis", s=12, zorder=3)
    if anchors_xy is not None:
        _annotate(ax, anchors_xy, [f"A{i}" for i in range(len(anchors_xy))])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return save(fig, path)


def curves(x: np.ndarray, ys: np.ndarray, path: str | os.PathLike, xlabel: str, ylabel: str,
           hlines: Sequence[float] = (), title: str | None = None) -> Path:
    """Many curves on one axis (per-image FSC curves), with their mean in black and dotted levels."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for y in ys:
        ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8)
    if len(ys):
        ax.plot(x, np.mean(ys, axis=0), color="k", linewidth=1.6, label="mean")
        ax.legend()
    for h in hlines:
        ax.axhline(h, color="k", linestyle=":", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return save(fig, path)


# ---- maps as pictures (the one home of "volume to picture") ---------------------------------------------

#: The six views of a map, in column order: central slices, then sums along the remaining axis.
#: Maps are arrays [z, y, x]; each view is shown with its first axis downward, as numpy and RELION show
#: them ("XY" has rows y and columns x; "XZ" rows z, columns x; "YZ" rows z, columns y).
VIEW_NAMES = ("XY slice", "XZ slice", "YZ slice", "XY projection", "XZ projection", "YZ projection")
#: Rows per contact sheet: a longer series (a 100-frame traversal) is shown at this many evenly spaced maps,
#: first and last included, so the sheet stays a page people can take in at a glance.
MAX_SHEET_ROWS = 20
#: On-screen size of one panel: small boxes are enlarged by whole-pixel repetition (no smoothing hides
#: the voxels), large ones are averaged down in whole blocks.
PANEL_PX = 128
#: Percentiles of the series' values mapped to black and white: one scale for all slices and one for all
#: projections of a series, so maps can be compared by eye (a weaker map looks fainter), while a few
#: extreme voxels (decoder ringing at the box edge) do not wash the rest out.
GREY_PERCENTILES = (0.5, 99.5)
_SHEET_DPI = 100
_LABEL_W, _HEADER_H, _TITLE_H, _GAP = 96, 22, 24, 4


def even_subsample(length: int, max_points: int | None) -> np.ndarray:
    """Positions 0..length-1 thinned to at most max_points, evenly spaced, both ends kept (a long map
    series shown or decoded in part: traversal volumes, contact-sheet rows)."""
    if max_points is None or length <= max_points:
        return np.arange(length)
    if max_points < 2:
        return np.array([0], dtype=np.int64)
    return np.unique(np.round(np.linspace(0, length - 1, max_points)).astype(np.int64))


def volume_views(vol: np.ndarray) -> np.ndarray:
    """The six views of one map (VIEW_NAMES order) as a (6, D, D) float32 array.

    Slices are taken through the box centre, index D // 2, the origin of the project's centred Fourier
    convention (docs/architecture.md); projections sum every voxel along the viewing axis.
    """
    v = np.asarray(vol, dtype=np.float32)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise ValueError(f"expected a cubic map (D, D, D), got shape {v.shape}")
    c = v.shape[0] // 2
    return np.stack([v[c], v[:, c, :], v[:, :, c], v.sum(0), v.sum(1), v.sum(2)])


def grey_levels(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values to 8-bit grey: lo and below black, hi and above white, linear in between."""
    v = np.asarray(values, dtype=np.float64)
    scaled = (v - lo) / (hi - lo) if hi > lo else np.zeros(v.shape)
    return np.round(255.0 * np.clip(scaled, 0.0, 1.0)).astype(np.uint8)


def _panel_pixels(D: int) -> tuple[int, int]:
    """(repeat, block) for a D-voxel view: enlarge small boxes by repetition, shrink big ones by averaging."""
    if D <= PANEL_PX:
        return max(1, PANEL_PX // D), 1
    return 1, -(-D // PANEL_PX)


def _resize(img: np.ndarray, repeat: int, block: int) -> np.ndarray:
    if block > 1:
        n = (img.shape[0] // block) * block
        img = img[:n, :n].reshape(n // block, block, n // block, block).mean(axis=(1, 3))
    return np.repeat(np.repeat(img, repeat, 0), repeat, 1) if repeat > 1 else img


@dataclass
class ContactSheet:
    """Where each panel of a written contact sheet lies, so tests and callers can find a map's view.

    `boxes[r][c]` is the (top, left) pixel of row r (the map `shown[r]` of the series) and column c
    (VIEW_NAMES[c]); each panel is `panel` pixels square. `scales` holds the (black, white) values of the
    slices and of the projections.
    """

    path: Path
    shown: list[int]
    panel: int
    repeat: int
    block: int
    boxes: list[list[tuple[int, int]]]
    scales: dict[str, tuple[float, float]]


def volume_sheet(vols: np.ndarray | Sequence[np.ndarray], path: str | os.PathLike,
                 names: Sequence[str] | None = None, title: str | None = None,
                 max_rows: int = MAX_SHEET_ROWS) -> ContactSheet:
    """A contact sheet of a map series as PNG: one row per map, columns VIEW_NAMES, shared grey scales.

    The panels are placed pixel for pixel (no resampling by the plotting library), so a panel of the PNG
    holds exactly `grey_levels` of the view, enlarged by whole-pixel repetition. Series longer than
    `max_rows` are shown at evenly spaced maps, first and last included (`shown`).
    """
    m = len(vols)
    if m == 0:
        raise ValueError("no maps to picture")
    shown = even_subsample(m, max_rows).tolist()
    views = np.stack([volume_views(vols[i]) for i in shown])          # (rows, 6, D, D)
    scales = {}
    for kind, cols in (("slice", slice(0, 3)), ("projection", slice(3, 6))):
        lo, hi = np.percentile(views[:, cols], GREY_PERCENTILES)
        scales[kind] = (float(lo), float(hi))
    D = views.shape[-1]
    repeat, block = _panel_pixels(D)
    panel = (D // block) * repeat
    top0 = (_TITLE_H if title else 0) + _HEADER_H
    width = _LABEL_W + len(VIEW_NAMES) * (panel + _GAP)
    height = top0 + len(shown) * (panel + _GAP)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    boxes = []
    for r in range(len(shown)):
        row = []
        for c in range(len(VIEW_NAMES)):
            top, left = top0 + r * (panel + _GAP), _LABEL_W + c * (panel + _GAP)
            lo, hi = scales["slice" if c < 3 else "projection"]
            canvas[top:top + panel, left:left + panel] = grey_levels(_resize(views[r, c], repeat, block),
                                                                     lo, hi)[..., None]
            row.append((top, left))
        boxes.append(row)

    plt = _pyplot()
    fig = plt.figure(figsize=(width / _SHEET_DPI, height / _SHEET_DPI), dpi=_SHEET_DPI)
    fig.figimage(canvas, 0, 0, origin="upper")

    def text(x: float, y: float, s: str, **kw) -> None:  # pixel coordinates from the top-left corner
        fig.text(x / width, 1.0 - y / height, s, fontsize=8, va="center", **kw)

    if title:
        text(4, _TITLE_H / 2, title, weight="bold")
    for c, name in enumerate(VIEW_NAMES):
        text(_LABEL_W + c * (panel + _GAP) + panel / 2, top0 - _HEADER_H / 2, name, ha="center")
    for r, i in enumerate(shown):
        label = names[i] if names is not None else f"map {i}"
        text(4, top0 + r * (panel + _GAP) + panel / 2, label)
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=_SHEET_DPI)
    plt.close(fig)
    return ContactSheet(out, shown, panel, repeat, block, boxes, scales)


def bars(counts: np.ndarray, path: str | os.PathLike, xlabel: str, ylabel: str, title: str | None = None
         ) -> Path:
    """Bar chart of counts per category 0, 1, …, each bar labelled with its count (e.g. state sizes)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = np.arange(len(counts))
    ax.bar(x, counts, color="tab:blue")
    for i, c in enumerate(counts):
        ax.annotate(str(int(c)), (i, c), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return save(fig, path)
