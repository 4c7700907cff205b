"""`drgn encode`: latent values of particles under a trained model."""

from __future__ import annotations

import argparse

HELP = "compute latent values (posterior means) of particles with a trained model"
DESCRIPTION = """\
Run a trained model's encoder over the particles of a stack and write their posterior means as an
(N, zdim) float32 .npy, rows in the order of --ind (default: every table row in order; a row
listed twice is encoded twice). The stack must
be at the model's box size; the normalisation learnt in training is reused, so latents of a new stack
are comparable with the run's z.npy.

Example:
  drgn encode runs/pilot table.star particles.128.mrcs -o z_all.npy
  drgn encode runs/highres table.star particles.256.mrcs -o z_kept.npy --ind kept.npy --logvar-out zlv.npy
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory of drgn train (or its model.pt)")
    p.add_argument("table", help="canonical particle table")
    p.add_argument("stack", help="particle stack whose row i is table row i, at the model's box size")
    p.add_argument("-o", "--out", required=True, help="output .npy of posterior means (N × zdim)")
    p.add_argument("--ind", help="index file (.npy or .txt) of table rows to encode (default: all)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a cryoDRGN index pickle (*.ind.pkl) as --ind (restricted unpickler)")
    p.add_argument("--logvar-out", help="also write the posterior log-variances here")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="encoder arithmetic (default: the precision the model was trained in, which "
                        "reproduces the run's z.npy)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from drgn_core.data import ParticleData, open_particles
    from drgn_core.errors import DrgnError, InputError
    from drgn_core.io.atomic import refuse_overwrite_input
    from drgn_core.io.indices import read_index_file
    from drgn_core.io.table import read_table
    from drgn_core.models import load_model
    from drgn_core.rundir import resolve_device
    from drgn_core.train import encode_latents, resolve_precision, save_npy

    if args.batch_size < 1:
        raise DrgnError(f"--batch-size must be >= 1, got {args.batch_size}")
    refuse_overwrite_input([args.out, args.logvar_out], [args.table, args.stack, args.ind])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, cfg = load_model(args.run, device=device)
    if cfg.zdim == 0:
        raise DrgnError(f"{args.run}: the model is homogeneous (zdim 0) and has no encoder")
    table = read_table(args.table)
    source = open_particles(args.stack, table)
    if source.D != cfg.D:
        raise InputError(f"images are {source.D} px but the model was trained at D = {cfg.D}; use a stack "
                         f"downsampled to {cfg.D}", args.stack)
    if args.ind is None:
        rows = np.arange(len(table))
    else:  # repeated rows are allowed here: the latents come out in the order asked
        rows = read_index_file(args.ind, len(table), allow_duplicates=True,
                               allow_pickle=args.allow_pickle)
    order = np.argsort(rows, kind="stable")  # read the stack in row order, write in the order asked
    # one pass over the data: stream chunks rather than preparing everything first
    data = ParticleData(source, table, rows[order], model.lattice, cfg.norm_scale, device, mode="stream")
    precision = args.precision or model.trained_precision
    mu, logvar = encode_latents(model, data, resolve_precision(precision, device), args.batch_size)
    out_mu, out_lv = np.empty_like(mu), np.empty_like(logvar)
    out_mu[order], out_lv[order] = mu, logvar
    save_npy(Path(args.out), out_mu)
    if args.logvar_out:
        save_npy(Path(args.logvar_out), out_lv)
    print(f"wrote latents of {len(rows)} particles (zdim {cfg.zdim}) to {args.out}")
    return 0
