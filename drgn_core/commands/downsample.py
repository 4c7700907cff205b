"""`drgn downsample`: Fourier-crop every particle of a table into one stack with a JSON sidecar."""

from __future__ import annotations

import argparse

HELP = "Fourier-crop all particles of a table to a D×D stack (particles.D.mrcs + .json sidecar)"
DESCRIPTION = """\
Read every image of the canonical particle table (from the original stacks, contrast sign applied),
crop its Fourier transform to D×D (exact below the new Nyquist, nothing above it), and write one stack
whose row i is table row i, with pixel size apix0·D0/D. A JSON sidecar beside it (particles.D.json)
records D, apix, the original D0 and apix0, and the table it came from. Images stream in chunks, so
memory stays bounded; the stack appears only when complete. -D equal to the original box copies the
images with their sign applied.

Optics groups with different pixel sizes and/or boxes (merged sessions) are each cut to a centred window
of the same physical size and Fourier-cropped to D, so the stack has one pixel size; the sidecar lists
what was done per group. Spreads that this cannot hide at the asked -D (a visible stretch, or a group
asked for detail beyond its own Nyquist) are refused with the figures and the largest -D that works.
NaN, infinite or all-zero images stop the run, naming the stack and the image's 1-based number.

Example:
  drgn downsample work/table.star -D 128 -o work/particles.128.mrcs --float16
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", help="canonical particle table (from drgn import or drgn simulate)")
    parser.add_argument("-D", type=int, required=True, help="new box size in pixels (even, ≤ original box)")
    parser.add_argument("-o", "--output", required=True, help="stack to write, e.g. particles.128.mrcs")
    parser.add_argument("--chunk", type=int, default=1000, help="images per chunk (bounds memory; "
                        "default 1000)")
    parser.add_argument("--float16", action="store_true", help="store half precision (MRC mode 12): half "
                        "the disk and memory, enough for training")
    parser.add_argument("--max-threads", type=int, help="at most this many threads for the FFTs "
                        "(default: torch's default)")


def run(args: argparse.Namespace) -> int:
    from drgn_core.downsample import downsample_table
    from drgn_core.io.table import read_table

    table = read_table(args.table)
    stack = downsample_table(table, args.D, args.output, chunk=args.chunk, float16=args.float16,
                             max_threads=args.max_threads)
    if stack.groups:
        origin = "; ".join(f"optics group {g['optics_group']}: {g['n']} images of {g['D0']} px at "
                           f"{g['apix0']:g} Å/px, window {g['window']} px, scale {g['scale']:.4g}"
                           for g in stack.groups)
    else:
        origin = f"{stack.D0} px at {stack.apix0:g} Å/px"
    print(f"Wrote {args.output}: {stack.n} images of {stack.D}×{stack.D} px at {stack.apix:g} Å/px "
          f"(from {origin}), {stack.dtype}.")
    return 0
