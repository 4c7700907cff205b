"""`drgn convergence`: how much a run's latent space and maps still changed from one epoch to the next."""

from __future__ import annotations

import argparse

HELP = "compare a run's epochs: latent change, neighbours kept, FSC of maps at fixed on-data points"
DESCRIPTION = """\
Compares consecutive epoch snapshots of a training run (checkpoints/z.EEE.npy + model.EEE.pt, kept by
drgn train --encode-every 1 or --epochs auto; the finished z.npy and model.pt count as the last epoch)
with three measures, each between 0 and 1:

  latent change    the fraction of the latent's variance that the best affine map of the other epoch's
                   latent cannot explain (rotations, flips and stretches of the latent do not count);
  neighbours kept  the mean fraction of each particle's 10 nearest latent neighbours still among its 10
                   nearest (2,000 seeded particles);
  map agreement    FSC-AUC / its maximum between the two epochs' maps decoded at the same particles'
                   latents: the particles nearest to k-means centres (--points) of the last epoch's latent,
                   chosen once; the mean over the points (and the worst) is reported.

Writes OUTDIR/convergence.json (every pair's measures, the points, the stopping rule and the epoch after
which drgn train --epochs auto would have stopped) and OUTDIR/convergence.png (one panel per measure,
with the rule's limits dotted). A measure that has flattened says more epochs will not change what an
analysis shows; compare outputs, not the loss.

Example:
  drgn train table.star particles.64.mrcs -o run --zdim 10 --epochs 30 --encode-every 1
  drgn convergence run -o run/convergence
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory of drgn train, trained with --encode-every or --epochs auto")
    p.add_argument("-o", "--outdir", help="folder for convergence.json and convergence.png "
                                          "(default RUN/convergence)")
    p.add_argument("--points", type=int, default=6,
                   help="on-data points whose maps are compared between epochs; 0 skips the maps (default 6)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the k-means and the particle sample (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto: where maps are decoded (default cpu)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from drgn_core.convergence import convergence
    from drgn_core.errors import DrgnError

    if args.points < 0:
        raise DrgnError(f"--points must be >= 0, got {args.points}")
    outdir = Path(args.outdir) if args.outdir else Path(args.run) / "convergence"
    res = convergence(args.run, outdir, points=args.points, seed=args.seed, device=args.device)
    stop = res["auto_would_stop_after"]
    print(f"{len(res['pairs'])} epoch pairs compared -> {outdir}/convergence.json, convergence.png; "
          + (f"--epochs auto would have stopped after epoch {stop}" if stop else
             "the measures did not settle by the stopping rule within these epochs"))
    return 0
