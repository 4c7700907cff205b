"""`drgn analyze`: PCA, UMAP, k-means and PC traversals of a run's latents, with volumes and plots."""

from __future__ import annotations

import argparse
import sys

HELP = "latent-space analysis of a trained run: PCA, UMAP, k-means centres, PC traversals, volumes"
DESCRIPTION = """\
Analyse the latent space of a drgn train run (its z.npy and indices.npy) the way the cryoDRGN paper does:

  pca.npy, pca_explained_variance.png, pca_{scatter,hexbin}.png      PCA (all components)
  umap.npy, umap_{scatter,hexbin}.png                               2-D UMAP (k=15, min_dist 0.1, seeded;
                                                                    above --umap-max-fit particles fitted on a
                                                                    random subsample, the rest transformed)
  kmeans{K}/labels.npy, centers.txt, centers_ind.npy/.txt, vol_*    k-means; 'on-data' centres (the particle
                                                                    nearest each centre; canonical table rows)
  pc1/, pc2/ …                                                      volumes along each PC, 5th→95th percentile
  percentiles/                                                      zdim 1: volumes at percentiles 5,23,…,95
  z_hist.png                                                        zdim 1: histogram of z
  labels/                                                           --labels: a volume at each label's mean z
  summary.json                                                      all numbers above

Every volume folder holds vol_NNN.mrc, z_values.txt and maps.png (central slices and projections of
every map, one row per map). The output folder is written whole, atomically.
--labels takes a .npy or .txt (one label per line) aligned to the canonical table's rows (e.g. published
3D classes). Use the same --seed in drgn filter's kmeans rule to get the same cluster ids.

Example:
  drgn analyze results/highres/train -o results/highres/analyze --ksample 20 --pc 2 --labels classes.txt
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory of drgn train (z.npy, indices.npy, model.pt)")
    p.add_argument("-o", "--outdir", required=True, help="output folder (replaced whole)")
    p.add_argument("--ksample", type=int, default=20, metavar="K", help="k-means clusters (default 20)")
    p.add_argument("--pc", type=int, default=2, dest="n_pcs", metavar="N",
                   help="PC traversals along the first N PCs (default 2)")
    p.add_argument("--pc-points", type=int, default=10, help="volumes per PC traversal (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed for UMAP, its subsample and k-means (default 0)")
    p.add_argument("--labels", help="labels per canonical table row (.npy or .txt): a volume per label mean")
    p.add_argument("--skip-volumes", action="store_true", help="no volumes (plots and numbers only)")
    p.add_argument("--skip-umap", action="store_true", help="no UMAP")
    p.add_argument("--umap-max-fit", type=int, default=100_000, metavar="N",
                   help="fit UMAP on a random N particles and transform the rest (default 100000)")
    p.add_argument("-D", type=int, dest="D", help="box size of the volumes (default: the training box)")
    p.add_argument("--device", default="auto", help="device for volume generation: auto, cpu or cuda")


def run(args: argparse.Namespace) -> int:
    from drgn_core.analysis import AnalyzeOptions, analyze
    from drgn_core.errors import DrgnError

    if args.umap_max_fit < 100:
        raise DrgnError(f"--umap-max-fit must be >= 100, got {args.umap_max_fit}")
    opts = AnalyzeOptions(ksample=args.ksample, n_pcs=args.n_pcs, pc_points=args.pc_points, seed=args.seed,
                          skip_volumes=args.skip_volumes, skip_umap=args.skip_umap,
                          umap_max_fit=args.umap_max_fit, labels=args.labels, D=args.D, device=args.device)
    s = analyze(args.run, args.outdir, opts)
    if s["n_held_out"]:
        n, held = s["n_particles"], s["n_held_out"]
        print(f"note: {held} of {n} particles ({100 * held / n:.0f} %) were held out of training "
              "(val_indices.npy) or left out by --train-subset; their latents come from an "
              "encoder that never saw them and, below about 1e5 particles, are close to noise. Retrain with "
              "--val-frac 0 (and no --train-subset) to analyse every particle.",
              file=sys.stderr)
    print(f"analysed {s['n_particles']} particles (zdim {s['zdim']}) → {args.outdir}")
    return 0
