"""`drgn import`: a RELION STAR or cryoSPARC .cs particle file → the canonical particle table."""

from __future__ import annotations

import argparse

HELP = "import RELION .star / cryoSPARC .cs / stack-list particles into a canonical particle table"
DESCRIPTION = """\
Read a particle file with consensus poses and CTF — RELION 3.0 or 3.1+/5 STAR, or a cryoSPARC .cs
(numpy or stream format) — check everything (stacks exist, image indices are inside their stacks, one
even square box, one pixel size, CTF and poses present and finite, optics groups defined), and write the
canonical particle table (a RELION 3.1 STAR with drgnflow's columns) that every later stage reads.
All problems are reported together; nothing is written unless the input is sound.

Poses may come from a second file (--poses: .cs, .star or cryoDRGN poses.pkl) and CTF from a cryoDRGN
ctf.pkl (--ctf); a .txt list of stacks holds images only and needs both. Optics values the file lacks or
gets wrong are given with --apix, --kv, --cs, --amp-contrast and --phase-shift.

Stack paths are tried relative to --datadir (as written, then by file name) and then to the input
file's folder. cryoSPARC blob/sign = -1 (dark particles) is recorded and applied when images are read.

Example:
  drgn import Refine3D/job012/run_data.star --datadir . -o work/table.star
  drgn import J42/J42_particles.cs --datadir /data/cryosparc/P3 -o work/table.star --check-nan
  drgn import Parameters.star --amp-contrast 0.1 -o work/table.star   # a RELION 3.0 file without w
  drgn import Parameters.star --poses P11_J4_003.cs -o work/table.star  # poses from a cryoSPARC refinement
  drgn import stacks.txt --poses poses.pkl --ctf ctf.pkl --allow-pickle -o work/table.star  # cryoDRGN inputs
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="particle file: .star (RELION 3.0/3.1+/5), .cs (cryoSPARC) or a .txt "
                        "list of stacks (then --poses and --ctf are required)")
    parser.add_argument("-o", "--output", required=True, help="canonical particle table to write (.star)")
    parser.add_argument("--datadir", help="folder the stack paths are relative to (RELION/cryoSPARC project "
                        "folder); default: the input file's folder")
    parser.add_argument("--apix", type=float, help="pixel size of the particle images in Å (overrides the "
                        "file; needed when it does not say)")
    parser.add_argument("--kv", type=float, help="acceleration voltage in kV (overrides the file; needed "
                        "when it does not say)")
    parser.add_argument("--cs", type=float, help="spherical aberration Cs in mm (overrides the file)")
    parser.add_argument("--amp-contrast", type=float, help="amplitude contrast, e.g. 0.1 (overrides the "
                        "file; "
                        "RELION 3.0 files may lack it)")
    parser.add_argument("--phase-shift", type=float, help="phase shift in degrees for every particle "
                        "(overrides the file; absent means 0)")
    parser.add_argument("--poses", metavar="POSES_FILE", help="take the consensus poses from this file "
                        "instead: a cryoSPARC .cs, a RELION .star or a cryoDRGN poses.pkl (rows matched by "
                        "uid when both files have cryoSPARC uids, else by order)")
    parser.add_argument("--no-poses", action="store_true",
                        help="the file has no poses (CTF only, or 2D alignments only): import with identity "
                             "placeholders for drgn abinit, which finds the poses")
    parser.add_argument("--ctf", metavar="CTF_PKL", help="take the CTF parameters and optics from a cryoDRGN "
                        "ctf.pkl instead (rows matched by order)")
    parser.add_argument("--allow-pickle", action="store_true", help="read cryoDRGN .pkl files (--poses, "
                        "--ctf); pickles can run code, so they are read only with this flag, through a "
                        "restricted unpickler that admits numpy arrays only")
    parser.add_argument("--box", type=int, help="expected box size in pixels, checked against the stacks")
    parser.add_argument("--invert", action="store_true", help="invert the contrast (use when the stacks hold "
                        "dark particles and the metadata does not say so)")
    parser.add_argument("--check-nan", action="store_true", help="also scan every image for NaN/Inf pixels "
                        "(reads all images)")


def run(args: argparse.Namespace) -> int:
    from drgn_core.importing import import_particles, summary
    from drgn_core.io.atomic import refuse_overwrite_input
    from drgn_core.io.table import write_table

    refuse_overwrite_input([args.output], [args.input, args.poses, args.ctf])
    table = import_particles(args.input, datadir=args.datadir, apix=args.apix, box=args.box,
                             invert=args.invert, check_nan=args.check_nan, kv=args.kv, cs=args.cs,
                             amp_contrast=args.amp_contrast, phase_shift=args.phase_shift,
                             poses=args.poses, ctf=args.ctf, allow_pickle=args.allow_pickle,
                             no_poses=args.no_poses)
    write_table(table, args.output)
    print(summary(table, args.input) + f" Wrote {args.output}.")
    return 0
