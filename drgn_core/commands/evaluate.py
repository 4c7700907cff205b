"""`drgn evaluate`: accuracy of a run against a simulated dataset's ground truth.

Metrics as docs/architecture.md § Metrics on simulated data defines them.
"""

from __future__ import annotations

import argparse

HELP = "ground-truth metrics of a run on simulated data: |Spearman|, ARI/NMI, filter F1, per-image FSC"
DESCRIPTION = """\
Score a training run against the ground truth that drgn simulate writes into the table (drgnGtCoord,
drgnGtState, drgnGtJunk, drgnGtVolume):

  spearman         |Spearman ρ| between z (zdim 1) or PC1 and the reaction coordinate (junk excluded)
  clustering       ARI and NMI (arithmetic) of k-means with K = number of true states (junk excluded)
  held_out         when the run held particles out (--val-frac > 0): |Spearman ρ| on the trained and on
                   the held-out particles separately (an encoder that memorised its training images
                   encodes unseen ones badly; this shows it)
  filter           --filter-dir: precision/recall/F1 of its removed.npy against the injected junk
  per_image_fsc    --gt-dir: for --n-fsc images spread evenly over the coordinate (or the states), FSC of
                   the volume decoded at the image's z against gt_volumes/vol_{drgnGtVolume:03d}.mrc;
                   FSC-AUC mean ± std and the resolution at FSC 0.5 (the curve is drgn fsc's)

Example:
  drgn evaluate results/highres/train --table sim/table.star --gt-dir sim/gt_volumes \\
      --filter-dir results/filter -o results/metrics.json --plot results/fsc_per_image.png
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory of drgn train")
    p.add_argument("--table", required=True, help="canonical table with ground-truth columns")
    p.add_argument("--gt-dir", help="folder of ground-truth volumes vol_NNN.mrc (per-image FSC)")
    p.add_argument("--filter-dir", help="output folder of drgn filter (filter precision/recall/F1)")
    p.add_argument("--n-fsc", type=int, default=100, help="images for the per-image FSC (default 100)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    p.add_argument("--plot", help="also plot the per-image FSC curves to this PNG")
    p.add_argument("--device", default="auto", help="device for volume generation: auto, cpu or cuda")
    p.add_argument("-o", "--output", required=True, help="metrics JSON file")


def run(args: argparse.Namespace) -> int:
    from drgn_core.evaluate import evaluate

    m = evaluate(args.run, args.table, args.output, gt_dir=args.gt_dir, filter_dir=args.filter_dir,
                 n_fsc=args.n_fsc, seed=args.seed, plot=args.plot, device=args.device)
    parts = []
    if m["spearman"].get("value") is not None:
        parts.append(f"|spearman| {m['spearman']['value']:.3f}")
        h = m.get("held_out", {})
        if h.get("spearman_trained") is not None and h.get("spearman_held_out") is not None:
            parts.append(f"(trained {h['spearman_trained']:.3f}, {h['n']} held out "
                         f"{h['spearman_held_out']:.3f})")
    if m["clustering"].get("ari") is not None:
        parts.append(f"ARI {m['clustering']['ari']:.3f} NMI {m['clustering']['nmi']:.3f}")
    if "filter" in m:
        parts.append(f"filter F1 {m['filter']['f1']:.3f}")
    if "per_image_fsc" in m:
        f = m["per_image_fsc"]
        parts.append(f"FSC-AUC {f['auc_mean']:.3f} ± {f['auc_std']:.3f}")
    print(", ".join(parts) + f" → {args.output}" if parts else f"no applicable metric → {args.output}")
    return 0
