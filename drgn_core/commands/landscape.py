"""`drgn landscape`: structural states found in the space of decoded maps (cryoDRGN's analyze_landscape)."""

from __future__ import annotations

import argparse

HELP = "landscape analysis: decode many maps, mask, volume PCA, cluster maps into states, per-state outputs"
DESCRIPTION = """\
Find structural states in the space of the maps themselves (cryoDRGN's analyze_landscape and
analyze_landscape_full in one command). Maps are decoded at on-data k-means centres of z (--maps of them,
box -D) in chunks of --chunk maps, so memory is bounded by a chunk; the mask is each map's voxels above
--threshold x its maximum, unioned over maps and dilated --dilate voxels (or --mask); PCA of the masked
voxels (--pcs); the maps are clustered into --states states (average-linkage agglomerative, or --cluster
gmm). A particle takes the state of the landscape map whose latent is nearest its own - one mapping, used
by every output, by drgn explore and by drgn export --landscape.

Outputs (in -o DIR, written whole, atomically):
  mask.mrc                              the mask
  maps/vol_NNN.mrc, z_values.txt        the landscape maps; centers_ind.npy: their on-data particles' rows;
                                        maps.png: a contact sheet of 20 of them
  vol_pca.npy, map_states.npy           each map's volume-PC coordinates and state
  vol_pc1/ … vol_pc3/                   maps along each volume PC (5th → 95th percentile of the maps)
  particle_states.npy, particle_map.npy every particle's state and landscape map (rows of the run's z)
  particle_vol_pca.npy                  every particle's volume-PC coordinates, from a network z → PCs
                                        fitted on the maps (held-out R² per PC in summary.json)
  states/state_K/indices.npy/.txt       canonical table rows of state K (for drgn export / filter)
  states/state_K/mean.mrc, spread.mrc   particle-weighted mean and standard deviation of its maps
  states/means.png, states/states.csv   contact sheet of the state means; counts per state
  vol_pca_maps_states.png, vol_pca_particles_states.png, states_umap.png, state_sizes.png,
  vol_pca_explained_variance.png, summary.json

Defaults: on a GPU, cryoDRGN 4.3's (1000 maps, box 128, 20 PCs, 10 states, dilation 5 px); on the CPU,
300 maps at box 64, which take a few minutes on 2 cores. The box never exceeds the training box unless -D
asks. States on the UMAP use --umap (or --analysis DIR: drgn analyze's umap.npy), else a UMAP computed
here (zdim > 2).

Example:
  drgn landscape results/highres/train -o results/highres/landscape --analysis results/highres/analyze
  drgn landscape runs/highres -o landscape --maps 1000 -D 128 --states 10 --device cuda
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory of drgn train (z.npy, indices.npy, model.pt)")
    p.add_argument("-o", "--outdir", required=True, help="output folder (replaced whole)")
    p.add_argument("--maps", type=int, dest="n_maps", metavar="N",
                   help="maps decoded (default 1000 on a GPU, 300 on the CPU)")
    p.add_argument("-D", type=int, dest="D", help="box of the maps (default 128 on a GPU, 64 on the CPU, "
                   "at most the training box)")
    p.add_argument("--pcs", type=int, default=20, dest="n_pcs", metavar="K", help="volume PCs (default 20)")
    p.add_argument("--states", type=int, default=10, dest="n_states", metavar="K",
                   help="states the maps are clustered into (default 10)")
    p.add_argument("--cluster", choices=("agglomerative", "gmm"), default="agglomerative",
                   help="clustering of the maps' volume-PC coordinates (default agglomerative)")
    p.add_argument("--linkage", choices=("average", "ward", "complete", "single"), default="average",
                   help="agglomerative linkage (default average, as cryoDRGN)")
    p.add_argument("--mask", metavar="MASK.mrc", help="use this mask (box -D; voxels > 0.5 inside)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="computed mask: fraction of each map's maximum (default 0.5)")
    p.add_argument("--dilate", type=int, default=5, metavar="VOXELS",
                   help="computed mask: dilation in voxels (default 5)")
    p.add_argument("--chunk", type=int, default=32, metavar="N", help="maps in memory at once (default 32)")
    p.add_argument("--traversal-pcs", type=int, default=3, metavar="N",
                   help="volume PCs with maps along them (default 3)")
    p.add_argument("--umap", metavar="umap.npy", help="UMAP of the run's particles (drgn analyze's) for the "
                   "states-on-UMAP plot")
    p.add_argument("--analysis", metavar="DIR",
                   help="drgn analyze folder of the same run: its umap.npy, when "
                   "it has one, is used as --umap")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for k-means, GMM, the regressor and UMAP (default 0)")
    p.add_argument("--device", default="auto", help="device for decoding: auto, cpu or cuda (default auto)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from drgn_core.errors import InputError
    from drgn_core.landscape import LandscapeOptions, landscape

    if args.analysis is not None and args.umap is None:
        if not (Path(args.analysis) / "summary.json").exists():
            raise InputError("is not a drgn analyze folder (no summary.json)", args.analysis)
        found = Path(args.analysis) / "umap.npy"
        args.umap = str(found) if found.exists() else None

    opts = LandscapeOptions(n_maps=args.n_maps, D=args.D, n_pcs=args.n_pcs, n_states=args.n_states,
                            cluster=args.cluster, linkage=args.linkage, mask=args.mask,
                            threshold=args.threshold, dilate=args.dilate, chunk=args.chunk,
                            traversal_pcs=args.traversal_pcs, umap=args.umap, seed=args.seed,
                            device=args.device)
    s = landscape(args.run, args.outdir, opts)
    r2 = s["regressor"]["r2_per_pc"]
    r2_text = f"; z → volume PC1 held-out R² {r2[0]:.3f}" if r2 else ""
    print(f"landscape of {s['n_particles']} particles: {s['n_maps']} maps at D = {s['D']}, "
          f"{s['vol_pca']['n_pcs']} volume PCs, {s['states']['n_states']} states (sizes "
          f"{', '.join(map(str, s['states']['counts']))}){r2_text} → {args.outdir}")
    return 0
