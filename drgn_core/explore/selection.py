"""A selection, as the page describes it, evaluated over ALL particles; saving and loading it.

The page sends a plain JSON document:

    {"shapes": [{"op": "add"|"subtract"|"intersect", "kind": "lasso"|"box", "x": "UMAP1", "y": "UMAP2",
                 "points": [[x, y], ...]},                        # data coordinates of the two columns
                {"op": ..., "kind": "saved", "path": "selections/junk.ind.npy"}, ...],
     "thresholds": {"defocus": [lo, hi], ...}}

Shapes combine left to right, starting from nothing when the first one adds and from every particle
otherwise (so "subtract this lasso" alone means "all but these"); thresholds then keep the particles with
lo <= value <= hi, on the full columns, whatever the browser draws. No shapes and no thresholds select
every particle. The saved form is an ordinary index file (0-based canonical rows, `.ind.npy` + `.ind.txt`)
that every drgn command and the workflow's filter read, with a `.json` record beside it saying how it was
made, so a selection made by hand is reproducible and reviewable.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import numpy as np
from matplotlib.path import Path as MplPath

from drgn_core import __version__
from drgn_core.errors import DrgnError, InputError
from drgn_core.explore.data import ExploreData
from drgn_core.io.atomic import atomic_path
from drgn_core.io.indices import read_index_file, write_index_files

OPS = ("add", "subtract", "intersect")
KINDS = ("lasso", "box", "saved")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")
MAX_VERTICES = 20_000


def points_in_polygon(x: np.ndarray, y: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Mask of the points (x, y) inside the closed polygon (even-odd rule), vectorised over all points.

    Points outside the polygon's bounding box are rejected first, so a small lasso over 10⁶ particles
    tests only the few in its box (matplotlib's compiled crossing test does the rest).
    """
    poly = np.asarray(polygon, dtype=np.float64)
    inside = np.zeros(len(x), dtype=bool)
    if len(poly) < 3:
        return inside
    (x0, y0), (x1, y1) = poly.min(0), poly.max(0)
    cand = np.nonzero((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1))[0]
    if cand.size:
        pts = np.column_stack([x[cand].astype(np.float64), y[cand].astype(np.float64)])
        inside[cand] = MplPath(poly, closed=False).contains_points(pts, radius=0.0)
    return inside


def _as_float(v, what: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise DrgnError(f"{what} must be a number, got {v!r}") from None
    if not np.isfinite(f):
        raise DrgnError(f"{what} must be finite, got {v!r}")
    return f


def check_spec(spec) -> dict:
    """Validate the page's selection document (see the module docstring); returns it normalised."""
    if not isinstance(spec, dict):
        raise DrgnError("selection must be a JSON object with 'shapes' and 'thresholds'")
    shapes = spec.get("shapes") or []
    thresholds = spec.get("thresholds") or {}
    if not isinstance(shapes, list) or not isinstance(thresholds, dict):
        raise DrgnError("selection 'shapes' must be a list and 'thresholds' an object")
    out_shapes = []
    for i, s in enumerate(shapes):
        if not isinstance(s, dict) or s.get("op") not in OPS or s.get("kind") not in KINDS:
            raise DrgnError(f"selection shape {i}: needs op in {OPS} and kind in {KINDS}")
        if s["kind"] == "saved":
            if not isinstance(s.get("path"), str):
                raise DrgnError(f"selection shape {i}: a saved selection needs its 'path'")
            out_shapes.append({"op": s["op"], "kind": "saved", "path": s["path"]})
            continue
        pts = s.get("points")
        if not isinstance(pts, list) or not 2 <= len(pts) <= MAX_VERTICES:
            raise DrgnError(f"selection shape {i}: 'points' must list 2 to {MAX_VERTICES} [x, y] pairs")
        try:
            poly = [[_as_float(p[0], "x"), _as_float(p[1], "y")] for p in pts]
        except (TypeError, IndexError, KeyError):
            raise DrgnError(f"selection shape {i}: 'points' must be [x, y] pairs") from None
        if s["kind"] == "box":
            (ax, ay), (bx, by) = poly[0], poly[-1]
            poly = [[ax, ay], [bx, ay], [bx, by], [ax, by]]
        out_shapes.append({"op": s["op"], "kind": s["kind"], "x": str(s.get("x")), "y": str(s.get("y")),
                           "points": poly})
    out_thr = {}
    for col, rng in thresholds.items():
        if not isinstance(rng, list | tuple) or len(rng) != 2:
            raise DrgnError(f"threshold {col!r} must be [lo, hi]")
        lo, hi = _as_float(rng[0], f"threshold {col} lo"), _as_float(rng[1], f"threshold {col} hi")
        out_thr[str(col)] = [min(lo, hi), max(lo, hi)]
    return {"shapes": out_shapes, "thresholds": out_thr}


def selected_mask(data: ExploreData, spec: dict, resolve_saved=None) -> np.ndarray:
    """Boolean mask over the run's N particles selected by `spec` (already checked by check_spec).

    `resolve_saved(path) -> Path` confines a saved selection's path (the server's job).
    """
    shapes, thresholds = spec["shapes"], spec["thresholds"]
    n = data.n
    if not shapes:
        mask = np.ones(n, dtype=bool)
    else:
        mask = np.zeros(n, dtype=bool) if shapes[0]["op"] == "add" else np.ones(n, dtype=bool)
    for s in shapes:
        if s["kind"] == "saved":
            path = resolve_saved(s["path"]) if resolve_saved else Path(s["path"])
            rows = read_index_file(path)
            m = np.isin(data.indices, rows)
        else:
            m = points_in_polygon(data.column(s["x"]), data.column(s["y"]), np.asarray(s["points"]))
        if s["op"] == "add":
            mask |= m
        elif s["op"] == "subtract":
            mask &= ~m
        else:
            mask &= m
    for col, (lo, hi) in thresholds.items():
        v = data.column(col)
        mask &= (v >= lo) & (v <= hi)
    return mask


def check_name(name) -> str:
    """A plain file name for an output (no folders, no dots first): refuses anything that could escape."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise DrgnError(f"name {name!r} must be a plain file name (letters, digits, _ . + -, up to 100)")
    return name


def save_selection(data: ExploreData, spec: dict, mask: np.ndarray, folder: Path, name: str) -> dict:
    """Write folder/NAME.ind.npy (+ .ind.txt twin) and folder/NAME.json; returns the JSON record."""
    name = check_name(name)
    rows = np.sort(data.indices[mask])
    if rows.size == 0:
        raise DrgnError("the selection is empty; nothing to save")
    npy = folder / f"{name}.ind.npy"
    record = {
        "kind": "drgn explore selection",
        "index_file": npy.name,
        "count": int(rows.size), "n_run": data.n,
        "run": str(data.run_dir.resolve()),
        "table": str(data.table_path.resolve()) if data.table_path else None,
        "analysis": str(data.analysis_dir.resolve()) if data.analysis_dir else None,
        "shapes": spec["shapes"], "thresholds": spec["thresholds"],
        "combine": "shapes left to right (add = union, subtract = difference, intersect), then every "
                   "threshold lo <= value <= hi; all over the run's particles",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "drgnflow": __version__,
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_index_files(rows, npy)
    with atomic_path(folder / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return record


def load_selection(data: ExploreData, npy: Path) -> tuple[np.ndarray, dict | None]:
    """(mask over the run, the JSON record or None) of a saved index file; rows must be the run's."""
    n_table = len(data.table) if data.table is not None else None
    rows = read_index_file(npy, n_table)
    mask = np.isin(data.indices, rows)
    missing = rows.size - int(mask.sum())
    if missing:
        raise InputError(f"{missing} of its {rows.size} rows are not among the run's particles", npy)
    rec_path = npy.with_name(npy.name.removesuffix(".npy").removesuffix(".ind") + ".json")
    record = None
    if rec_path.exists():
        try:
            record = json.loads(rec_path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"unreadable selection record ({e})", rec_path) from None
    return mask, record
