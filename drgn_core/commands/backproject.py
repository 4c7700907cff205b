"""`drgn backproject`: classical reconstruction of a particle set, half maps and gold-standard FSC."""

from __future__ import annotations

import argparse

HELP = "back-project particles at their poses (CTF-corrected): map, half maps, GSFSC"
DESCRIPTION = """\
Classical Fourier back-projection of the particles at their consensus poses, with CTF correction (a
Wiener filter whose 1/SNR term comes from the half maps' FSC), to validate a selection or a volume from
the network with data alone. The particles are split into two halves (rlnRandomSubset when the table
has it, else a seeded random split); the gold-standard FSC between the half maps gives the resolution
at 0.143 (unmasked, and with the paper's loose mask).

Writes DIR/map.mrc (full data, Wiener-filtered; --lowpass filters it further), DIR/half1.mrc,
DIR/half2.mrc (lightly regularised, unfiltered), DIR/fsc.json and DIR/fsc.png.
STACK is a stack made by drgn downsample from this table; without it the original images are read.

Example:
  drgn backproject table.star particles.128.mrcs -o validation --ind filter/kept.npy
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", metavar="TABLE", help="canonical particle table")
    parser.add_argument("stack", metavar="STACK", nargs="?",
                        help="particles.D.mrcs from drgn downsample (default: the original images)")
    parser.add_argument("-o", "--outdir", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--ind", metavar="idx.npy", help="only these canonical rows (.npy or .txt)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a cryoDRGN index pickle (*.ind.pkl) as --ind (restricted unpickler)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random half split (default 0)")
    parser.add_argument("--lowpass", type=float, metavar="A", help="low-pass map.mrc at this resolution (Å)")
    parser.add_argument("--interpolation", choices=["trilinear", "nearest"], default="trilinear",
                        help="how a Fourier sample is spread on the grid (default trilinear)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--chunk", type=int, default=1024, help="images read at a time (default 1024)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from drgn_core.backproject import backproject_table, write_reconstruction
    from drgn_core.errors import InputError
    from drgn_core.io.atomic import refuse_overwrite_input
    from drgn_core.io.indices import read_index_file
    from drgn_core.io.table import read_table

    if args.lowpass is not None and args.lowpass <= 0:
        raise InputError(f"--lowpass must be a positive resolution in Å, got {args.lowpass}")
    if args.chunk < 1:
        raise InputError(f"--chunk must be at least 1, got {args.chunk}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise InputError(f"--device {device!r} is not a device (use cpu, cuda, cuda:N or auto)") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is available here")
    out = Path(args.outdir)
    names = ["map.mrc", "half1.mrc", "half2.mrc", "fsc.json", "fsc.png"]
    refuse_overwrite_input([out / n for n in names], [args.table, args.stack, args.ind])

    table = read_table(args.table)
    indices = read_index_file(args.ind, len(table), allow_pickle=args.allow_pickle) if args.ind else None
    if args.lowpass is not None:
        from drgn_core.io.stack import open_stack

        apix = open_stack(args.stack, table).apix if args.stack else table.apix
        if args.lowpass < 2 * apix:
            raise InputError(f"--lowpass {args.lowpass:g} Å is finer than Nyquist ({2 * apix:.3g} Å at "
                             f"{apix:.4g} Å/px)")
    rec = backproject_table(table, args.stack, indices, seed=args.seed, interpolation=args.interpolation,
                            device=device, chunk=args.chunk)
    report = write_reconstruction(rec, out, args.lowpass,
                                  extra={"table": str(args.table), "stack": args.stack, "ind": args.ind})
    print(f"back-projected {report['n_particles']} particles (D={report['D']}, {report['apix']:.3f} Å/px, "
          f"halves: {report['split']}): GSFSC 0.143 at {report['resolution_0.143_A']:.2f} Å unmasked, "
          f"{report['masked']['resolution_0.143_A']:.2f} Å with the paper mask → {out}")
    return 0
