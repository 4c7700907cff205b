"""`drgn abinit`: ab initio reconstruction — poses searched from scratch, then the cryoDRGN model."""

from __future__ import annotations

import argparse
from pathlib import Path

from drgn_core.commands.train import add_network_arguments

HELP = "ab initio: search poses from scratch, then train the model with them (no consensus poses needed)"
DESCRIPTION = """\
Reconstruct without consensus poses (e.g. an EMPIAR entry that deposits particles and CTF only). Two
phases, both resumable:

1. pose search: rounds of search and reconstruction at a growing Fourier radius L (--L-min → --L-max px).
   The first --soft-iterations rounds weigh every rotation of a near-uniform SO(3) grid (--base-rotations)
   and every shift of a --shift-points² grid (±--shift-extent px) by its posterior probability; the later
   rounds keep the --keep best poses per image and refine them locally (--local-levels, steps halved).
   The soft rounds run from --starts random starts; the hard rounds continue the start whose map aligns
   --probe common images most confidently (at low SNR one start in two can settle on a wrong map).
2. refinement: the cryoDRGN model (homogeneous decoder with --zdim 0, encoder + decoder otherwise) is
   trained for --epochs with per-particle pose corrections learned by gradient descent (from epoch
   --pose-start).
3. with --classes K (heterogeneous runs): the refined latent is cut into K classes, and for --class-rounds
   rounds every image is searched against every class's back-projected map and joins the best-fitting one
   (3D classification); a fresh model is then refined from those poses. One consensus map biases the
   poses of states far from it; this gives each image a reference of its own state (about 3x the CPU).

The output is a drgn train run directory (drgn volumes / analyze / traverse / explore read it as is), plus
poses.star (the canonical table with the found poses, which config.yaml names as the run's table, so
drgn export writes them into STAR and .cs files), confidence.npy/.png (per particle: the Δχ² gap between
the best pose and the best one > 20° away; low values are unreliable particles), search/ (the search's
back-projection and FSC), abinit.json and, with --classes, classes.npy (each particle's class).

The hand of the map is arbitrary (its mirror image fits the data equally well): check it, and flip it
with `drgn volumes --flip` and `drgn export --flip-hand`.

A killed run continues with --resume (checkpoints after every search round and refinement epoch); on the
CPU it ends with the result of an uninterrupted run.

Example:
  drgn abinit table.star particles.64.mrcs -o runs/abinit --zdim 0
  drgn abinit table.star particles.64.mrcs -o runs/abinit_het --zdim 8 --epochs 30 --classes 5
  drgn volumes runs/abinit -o runs/abinit/map --flip
"""

SEARCH_KEYS = ("iterations", "soft_iterations", "minibatch", "decay", "L_min", "L_max", "base_rotations",
               "keep", "local_levels", "shift_extent", "shift_points", "batch", "classes", "class_rounds",
               "starts", "probe")
REFINE_KEYS = ("epochs", "pose_start", "batch_size", "lr", "pose_lr", "beta")
MODEL_KEYS = ("zdim", "enc_dim", "enc_layers", "dec_dim", "dec_layers", "pe_type", "pe_dim", "feat_sigma")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", help="canonical particle table (drgn import / drgn simulate); poses not needed")
    p.add_argument("stack", help="particle stack whose row i is table row i (drgn downsample)")
    p.add_argument("-o", "--outdir", required=True, help="run directory to write")
    p.add_argument("--ind", help="index file of table rows to use (default: all)")
    p.add_argument("--resume", action="store_true", help="continue the run in --outdir from its checkpoints")
    p.add_argument("--auto-resume", action="store_true",
                   help="--resume when --outdir already holds a run (its config.yaml), else start one "
                        "(what a workflow rule rerun after a kill needs)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    m = p.add_argument_group("model (as drgn train)")
    m.add_argument("--zdim", type=int, help="latent dimension; 0 = homogeneous (default 0)")
    add_network_arguments(m)
    s = p.add_argument_group("pose search")
    s.add_argument("--iterations", type=int, help="search rounds (default 18)")
    s.add_argument("--soft-iterations", type=int,
                   help="of which soft (whole-grid posterior) first (default 15)")
    s.add_argument("--minibatch", type=int,
                   help="random images per soft round, 0 = all (default 200; small batches explore)")
    s.add_argument("--decay", type=float,
                   help="weight of earlier soft rounds' sums in the next reference (default 0.5)")
    s.add_argument("--L-min", dest="L_min", type=int,
                   help="Fourier radius (px) of the first round (default 10)")
    s.add_argument("--L-max", dest="L_max", type=int,
                   help="Fourier radius (px) of the last round (default min(24, D/2-1))")
    s.add_argument("--starts", type=int,
                   help="run the soft rounds from this many random starts and continue the one whose map "
                        "aligns a common probe of images most confidently: at low SNR a single start can "
                        "settle on a wrong map; 1: one start (default 4)")
    s.add_argument("--probe", type=int, help="with --starts: images each start is scored on (default 500)")
    s.add_argument("--base-rotations", type=int, help="points of the base SO(3) grid (default 2048, ~12°)")
    s.add_argument("--keep", type=int, help="poses kept per image for local refinement (default 8)")
    s.add_argument("--local-levels", type=int, help="local refinement levels (default 3)")
    s.add_argument("--shift-extent", type=float, help="shift search ±px (default 0.1·D)")
    s.add_argument("--shift-points", type=int, help="shift grid points per axis (default 7)")
    s.add_argument("--batch", type=int, help="images scored together (default 64)")
    s.add_argument("--classes", type=int,
                   help="heterogeneous runs: after a first refinement, cut its latent into this many classes "
                        "and search every image against every class map (3D classification), then refine "
                        "again from the classified poses; 0: off (default 0)")
    s.add_argument("--class-rounds", type=int, help="rounds of the multi-class search (default 6)")
    r = p.add_argument_group("refinement (gradient descent)")
    r.add_argument("--epochs", type=int, help="refinement epochs (default 20)")
    r.add_argument("--pose-start", type=int, help="epoch from which poses move too (default 5)")
    r.add_argument("--batch-size", type=int, help="images per step (default 8)")
    r.add_argument("--lr", type=float, help="model learning rate (default 1e-4)")
    r.add_argument("--pose-lr", type=float, help="pose correction learning rate (default 1e-3)")
    r.add_argument("--beta", type=float, help="KL weight (default 1/zdim)")
    x = p.add_argument_group("resources")
    x.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    x.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    x.add_argument("--data-mode", choices=["auto", "memory", "stream"], default="auto",
                   help="refinement: prepared images in memory or streamed (default auto)")


def _given(args: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _validate(opts: dict) -> None:
    from drgn_core.errors import DrgnError

    for k in ("iterations", "starts", "probe", "base_rotations", "keep", "shift_points", "batch", "epochs",
              "batch_size", "L_min", "enc_dim", "dec_dim"):
        if k in opts and opts[k] < 1:
            raise DrgnError(f"--{k.replace('_', '-')} must be >= 1, got {opts[k]}")
    if "decay" in opts and not 0 <= opts["decay"] < 1:
        raise DrgnError(f"--decay must be in [0, 1), got {opts['decay']}")
    for k in ("soft_iterations", "minibatch", "local_levels", "pose_start", "zdim", "L_max", "enc_layers",
              "dec_layers", "classes", "class_rounds"):
        if k in opts and opts[k] < 0:
            raise DrgnError(f"--{k.replace('_', '-')} must be >= 0, got {opts[k]}")
    for k in ("lr", "pose_lr", "feat_sigma"):
        if k in opts and not opts[k] > 0:
            raise DrgnError(f"--{k.replace('_', '-')} must be > 0, got {opts[k]}")
    if opts.get("classes") == 1:
        raise DrgnError("--classes must be 0 (off) or at least 2, got 1")
    if "shift_extent" in opts and opts["shift_extent"] < 0:
        raise DrgnError(f"--shift-extent must be >= 0, got {opts['shift_extent']}")


def run(args: argparse.Namespace) -> int:
    from drgn_core.abinit.run import abinit
    from drgn_core.io.atomic import refuse_overwrite_input

    model_opts, search_opts = _given(args, MODEL_KEYS), _given(args, SEARCH_KEYS)
    refine_opts = _given(args, REFINE_KEYS)
    _validate({**model_opts, **search_opts, **refine_opts})
    refuse_overwrite_input([args.outdir], [args.table, args.stack, args.ind])
    resume = args.resume or (args.auto_resume and (Path(args.outdir) / "config.yaml").is_file())
    run_dir = abinit(args.table, args.stack, args.outdir, model_opts, search_opts, refine_opts,
                     seed=args.seed, device=args.device, threads=args.threads, data_mode=args.data_mode,
                     ind_path=args.ind, resume=resume)
    print(f"ab initio run written to {run_dir}: poses in {run_dir}/poses.star, model in {run_dir}/model.pt "
          "(the map's hand is arbitrary)")
    return 0
