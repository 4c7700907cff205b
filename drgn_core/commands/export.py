"""`drgn export`: a selected particle subset back to RELION / cryoSPARC, identities intact."""

from __future__ import annotations

import argparse

HELP = "export a particle subset as a row subset of the original STAR / .cs (+ .csg), uid list, indices"
DESCRIPTION = """\
Export the particles selected by an index file (0-based rows of the canonical table, e.g. kept.npy from
drgn filter) back to the software they came from, without re-writing their metadata:

  NAME.star            when the source is a RELION STAR (3.0 or 3.1+): the original file with only the
                       selected particle rows kept - every block, column and value unchanged, images
                       still pointing at the original full-size stacks (names as in the original, i.e.
                       relative to your RELION project directory)
  NAME.cs, NAME.csg    when the source is a cryoSPARC .cs: a row subset with uids intact, and a result
                       group file for cryoSPARC's "Import Result Group" job (keep the two side by side)
  uids.txt             one uid per line, for cryoSPARC's Particle Sets Tool (when particles have uids)
  indices.npy/.txt     the canonical rows exported, in the exported order
  volumes.cxc          with --volumes DIR: a ChimeraX script playing DIR/vol_*.mrc as a volume series
  export.json          what was written, and from which source

A state of a landscape analysis is exported directly with --landscape DIR --state K (instead of --ind):
its particles are DIR/states/state_K/indices.npy, named state_K by default.

The source defaults to the file the table was imported from (recorded by drgn import); every exported row
is checked against the table (image name, or uid), so a different file is refused, not mis-subset.

Example:
  drgn export table.star --ind filter/kept.npy -o export --name kept --volumes analyze/kmeans20
  drgn export table.star --landscape results/highres/landscape --state 3 -o export_state3
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", metavar="TABLE", help="canonical particle table (drgn import/simulate)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--ind", metavar="keep.npy",
                       help="rows to export: .npy or .txt of 0-based canonical table rows")
    which.add_argument("--landscape", metavar="DIR", help="a drgn landscape folder: export one --state of it")
    parser.add_argument("--state", type=int, metavar="K", help="with --landscape: the state to export")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a cryoDRGN index pickle (*.ind.pkl) as --ind (restricted unpickler)")
    parser.add_argument("-o", "--outdir", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--source", metavar="ORIGINAL.star|.cs",
                        help="the user's original STAR or .cs (default: the table's recorded source)")
    parser.add_argument("--name", default=None,
                        help="base name of the .star/.cs/.csg (default: the index file's name, e.g. kept)")
    parser.add_argument("--volumes", metavar="DIR", help="folder of vol_*.mrc for the ChimeraX script")
    parser.add_argument("--from-table", action="store_true",
                        help="write NAME.star and NAME.cs from the table's own poses instead of a row subset "
                             "of the source file (automatic for the poses.star of a drgn abinit run)")
    parser.add_argument("--flip-hand", action="store_true",
                        help="mirror the poses (A -> M A M, M = diag(1,1,-1)): the poses of the mirror-image "
                             "map, for an ab initio run whose hand is wrong (implies --from-table)")
    parser.add_argument("--level-percentile", type=float, default=99.0, metavar="P",
                        help="ChimeraX surface level: this percentile of the first volume (default 99)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from drgn_core.errors import InputError
    from drgn_core.export import export_subset
    from drgn_core.io.atomic import atomic_path, refuse_overwrite_input
    from drgn_core.io.indices import read_index_file
    from drgn_core.io.table import read_table

    if not 0 < args.level_percentile < 100:
        raise InputError(f"--level-percentile must lie between 0 and 100, got {args.level_percentile}")
    if args.landscape is not None:
        from drgn_core.landscape import state_indices

        if args.state is None:
            raise InputError("--landscape needs --state K (the state to export)")
        args.ind = str(state_indices(args.landscape, args.state))
        args.name = args.name or f"state_{args.state}"
    elif args.state is not None:
        raise InputError("--state needs --landscape DIR")
    table = read_table(args.table)
    indices = read_index_file(args.ind, len(table), allow_pickle=args.allow_pickle)
    name = args.name or Path(args.ind).stem
    summary_path = Path(args.outdir) / "export.json"
    refuse_overwrite_input([summary_path], [args.table, args.ind, args.source])
    summary = export_subset(table, indices, args.outdir, source=args.source, name=name,
                            volumes_dir=args.volumes, level_percentile=args.level_percentile,
                            extra_inputs=(args.ind,),
                            from_table=args.from_table or "abinit_run" in table.provenance,
                            flip_hand=args.flip_hand)
    summary.update({"table": str(args.table), "ind": str(args.ind), "name": name})
    with atomic_path(summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    files = ", ".join(Path(p).name for p in summary["files"].values())
    print(f"exported {summary['n']} of {summary['n_table']} particles from {summary['source']} → "
          f"{args.outdir}: {files}")
    return 0
