"""`drgn volumes`: decode density maps at given latent values with a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "generate density maps from a trained model at given latent values"
DESCRIPTION = """\
Evaluate a trained model's decoder at latent points and write one .mrc per point (vol_000.mrc, …, with
the voxel size set), z_values.txt (row i = the latent value of vol_i) and maps.png, a contact sheet
of the maps (one row per map: central XY/XZ/YZ slices and projections on shared grey scales). Latent
values come from --z (numbers separated by commas or spaces; each group of zdim numbers is one point;
repeatable) and/or --z-file (.txt, one point per line, or .npy of shape (m, zdim)). A homogeneous model
(zdim 0) needs neither and writes one map.

-D resamples in Fourier space (smaller: cropped; larger: interpolated); the voxel size follows
(training pixel size × D_train / D) unless --apix is given. --lowpass filters to a resolution in Å
(soft edge); --flip writes the mirror image (for consensus poses of the wrong hand).

Example:
  drgn volumes runs/pilot -o runs/pilot/vols --z=-1.2,0,1.2     (write --z=... when values start with -)
  drgn volumes runs/highres -o maps --z-file runs/highres/analyze/kmeans20/centers.txt -D 128 --lowpass 8
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory of drgn train (or its model.pt)")
    p.add_argument("-o", "--outdir", required=True, help="folder for vol_NNN.mrc, z_values.txt and maps.png")
    p.add_argument("--z", action="append", metavar="VALUES", help="latent values, e.g. '0.1' or '0.1,0.5'")
    p.add_argument("--z-file", help="latent values: .txt (one point per line) or .npy (m × zdim)")
    p.add_argument("-D", type=int, dest="D", help="box size of the maps (default: the training box)")
    p.add_argument("--apix", type=float, help="voxel size to record, Å (default: from the training data)")
    p.add_argument("--lowpass", type=float, metavar="ANGSTROM", help="low-pass filter the maps to this (Å)")
    p.add_argument("--flip", action="store_true", help="write the mirror image (flip the hand)")
    p.add_argument("--prefix", default="vol", help="file name prefix (default vol)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")


def run(args: argparse.Namespace) -> int:
    from drgn_core.errors import DrgnError
    from drgn_core.rundir import resolve_device, run_model, write_volumes
    from drgn_core.volumes import parse_z_values

    if args.apix is not None and not args.apix > 0:
        raise DrgnError(f"--apix must be > 0, got {args.apix}")
    if args.lowpass is not None and not args.lowpass > 0:
        raise DrgnError(f"--lowpass must be > 0 Å, got {args.lowpass}")
    device = resolve_device(args.device)
    _, cfg = run_model(args.run, str(device))  # cached: write_volumes reuses it
    if cfg.zdim == 0:
        if args.z or args.z_file:
            raise DrgnError("the model is homogeneous (zdim 0): it takes no latent values")
        z = None
    else:
        z = parse_z_values(args.z, args.z_file, cfg.zdim)
    paths = write_volumes(args.run, z, args.outdir, D=args.D, apix=args.apix, lowpass_A=args.lowpass,
                          flip=args.flip, prefix=args.prefix, device=str(device))
    from drgn_core.volumes import sheet_name

    print(f"wrote {len(paths)} volume(s) to {args.outdir}; picture: "
          f"{Path(args.outdir) / sheet_name(args.prefix)}")
    return 0
