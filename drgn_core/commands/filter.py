"""`drgn filter`: declarative, reproducible particle filters on pilot runs' latent spaces."""

from __future__ import annotations

import argparse

HELP = "filter particles by rules on latent spaces (threshold, GMM, k-means, norm, box, selection)"
DESCRIPTION = """\
Decide which particles to keep from one or more training runs' latents, with rules written down in a
YAML spec (--spec) or, for simple cases, given as flags for the runs named with --run. Indices are
canonical table rows (each run's z rows map through its indices.npy).

Spec (the paper's EMPIAR-10076 pilots: z <= -1 in 1-D, the largest-‖z‖ GMM component in 10-D, kept sets
intersected):
  combine: intersection                     # across runs (intersection | union of kept sets)
  runs:
    - run: results/pilot/z1
      filters:
        - threshold: {dim: 0, op: '<=', value: -1}      # removes z[0] <= -1
    - run: results/pilot/z10
      filters:                              # 'combine:' here joins this run's filters (same meaning)
        - gmm: {components: 5, covariance: full, seed: 0, remove: {rule: largest_mean_norm, n: 1}}
Other filters: kmeans {k, seed, remove_ids: [..]} (same ids as drgn analyze with that k and seed);
norm {k_std: 3} (removes ‖z‖ > mean + 3 std); box {space: pca|umap, xmin, xmax, ymin, ymax,
keep: inside|outside, umap: analyze/umap.npy}; selection {path: picked.npy, keep: inside|outside} (a saved
index file of table rows, e.g. hand-picked in the explorer). gmm remove may also be {ids: [..]}, or
{rule: outlying_mean_norm, factor: 2}: every component whose mean ‖z‖ exceeds 2 × the median ‖z‖ (junk
of several kinds, without knowing how many). Either rule removes its components only when they stand
apart from the rest: Ashman's D between their ‖z‖ and the other particles' ≥ remove.separation (default 2;
0: remove whatever the separation, the paper's literal rule), so a set without junk loses nothing;
kmeans {k, separation: 2} removes the clusters separated so (among remove_ids, if given).
abinit_confidence {min: 5.0, run: runs/abinit} removes
particles whose drgn abinit pose confidence is below min (run: found through the filtered run's table
when it was trained on an abinit poses.star).

Outputs: kept.npy/.txt, removed.npy/.txt (sorted int64 rows), filter.json (the resolved spec, counts
per filter, per run and combined, seeds; with --table, precision/recall/F1 of removed vs drgnGtJunk),
filter.png (latents coloured kept/removed, and cluster ids, with the separation behind each gmm/k-means
decision; filter.json lists the D of every candidate shell). Same spec and data → identical outputs.

Examples:
  drgn filter --spec filter.yaml -o results/filter --table data/table.star
  drgn filter --run results/pilot/z1 --threshold 0 '<=' -1 -o results/filter_z1
  drgn filter --run results/pilot/z10 --gmm 5 --gmm-remove largest_mean_norm -o results/filter_z10
  drgn filter --run results/pilot/z10 --selection picked.npy -o results/filter_picked
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="YAML filter spec (see above)")
    p.add_argument("-o", "--outdir", required=True, help="output folder (replaced whole)")
    p.add_argument("--table", help="canonical table with ground truth: adds precision/recall/F1 vs junk")
    g = p.add_argument_group("simple filters without a spec (applied to every --run)")
    g.add_argument("--run", action="append", default=[], help="run directory (repeatable)")
    g.add_argument("--threshold", nargs=3, metavar=("DIM", "OP", "VALUE"),
                   help="remove z[DIM] OP VALUE, OP one of <= >= < > (quote it in the shell)")
    g.add_argument("--norm", type=float, metavar="K_STD", help="remove ‖z‖ > mean + K_STD·std")
    g.add_argument("--gmm", type=int, metavar="N", help="fit an N-component GMM")
    g.add_argument("--gmm-covariance", default="full", help="full, tied, diag or spherical (default full)")
    g.add_argument("--gmm-remove", default="largest_mean_norm", metavar="RULE|IDS",
                   help="largest_mean_norm (default: the one component of largest mean ‖z‖), "
                        "outlying_mean_norm (every component whose mean ‖z‖ > 2 × the median ‖z‖) or "
                        "comma-separated component ids")
    g.add_argument("--kmeans", type=int, metavar="K", help="k-means with K clusters (needs --kmeans-remove)")
    g.add_argument("--kmeans-remove", metavar="IDS", help="comma-separated k-means cluster ids to remove")
    g.add_argument("--box", nargs=5, metavar=("SPACE", "XMIN", "XMAX", "YMIN", "YMAX"),
                   help="rectangle in pca or umap coordinates ('inf'/'-inf' for open sides)")
    g.add_argument("--box-keep", default="inside", choices=("inside", "outside"))
    g.add_argument("--selection", metavar="FILE",
                   help="a saved index file (0-based table rows, .npy or .txt): keep only those particles")
    g.add_argument("--selection-keep", default="inside", choices=("inside", "outside"),
                   help="outside: remove the selected particles instead (default inside)")
    g.add_argument("--combine", default="intersection", choices=("intersection", "union"),
                   help="how filters and runs combine their kept sets (default intersection)")
    g.add_argument("--seed", type=int, default=0, help="seed for gmm, kmeans and umap (default 0)")


def _ids(text: str, flag: str) -> list[int]:
    from drgn_core.errors import DrgnError

    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise DrgnError(f"{flag}: expected comma-separated integer ids, got {text!r}") from None


def spec_from_flags(args: argparse.Namespace) -> dict:
    """The spec dict that the simple flags stand for (validated later like any spec)."""
    from drgn_core.errors import DrgnError

    filters: list[dict] = []
    if args.threshold:
        dim, op, value = args.threshold
        try:
            filters.append({"threshold": {"dim": int(dim), "op": op, "value": float(value)}})
        except ValueError:
            raise DrgnError("--threshold: expected DIM OP VALUE like 0 '<=' -1, got "
                            + " ".join(args.threshold)) from None
    if args.norm is not None:
        filters.append({"norm": {"k_std": args.norm}})
    if args.gmm is not None:
        rm = ({"rule": args.gmm_remove} if args.gmm_remove in ("largest_mean_norm", "outlying_mean_norm")
              else {"ids": _ids(args.gmm_remove, "--gmm-remove")})
        filters.append({"gmm": {"components": args.gmm, "covariance": args.gmm_covariance, "seed": args.seed,
                                "remove": rm}})
    if args.kmeans is not None:
        if not args.kmeans_remove:
            raise DrgnError("--kmeans needs --kmeans-remove IDS (which clusters to remove)")
        filters.append({"kmeans": {"k": args.kmeans, "seed": args.seed,
                                   "remove_ids": _ids(args.kmeans_remove, "--kmeans-remove")}})
    if args.box:
        space, *bounds = args.box
        try:
            vals = [float(b) for b in bounds]
        except ValueError:
            raise DrgnError(f"--box: bounds must be numbers, got {' '.join(bounds)}") from None
        box = {"space": space, "keep": args.box_keep, "seed": args.seed}
        box.update({k: v for k, v in zip(("xmin", "xmax", "ymin", "ymax"), vals) if abs(v) != float("inf")})
        filters.append({"box": box})
    if args.selection:
        filters.append({"selection": {"path": args.selection, "keep": args.selection_keep}})
    if not filters:
        raise DrgnError("give --spec FILE, or --run DIR with at least one filter flag")
    return {"combine": args.combine,
            "runs": [{"run": r, "combine": args.combine, "filters": filters} for r in args.run]}


def run(args: argparse.Namespace) -> int:
    from drgn_core.errors import DrgnError
    from drgn_core.filtering import parse_spec, read_spec, run_filter_spec

    flags = any(getattr(args, a) not in (None, [])
                for a in ("threshold", "norm", "gmm", "kmeans", "box", "selection", "run"))
    if args.spec and flags:
        raise DrgnError("give either --spec or --run with filter flags, not both")
    if args.spec:
        spec = read_spec(args.spec)
    else:
        if not args.run:
            raise DrgnError("give --spec FILE, or --run DIR with filter flags")
        spec = parse_spec(spec_from_flags(args), source=None)
    rep = run_filter_spec(spec, args.outdir, table_path=args.table, plot_seed=args.seed)
    c = rep["combined"]
    line = f"kept {c['kept']} of {c['particles']} particles, removed {c['removed']} → {args.outdir}"
    if "ground_truth" in rep:
        g = rep["ground_truth"]
        line += f" (vs junk: precision {g['precision']:.3f}, recall {g['recall']:.3f}, F1 {g['f1']:.3f})"
    print(line)
    return 0
