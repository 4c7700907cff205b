"""`drgn summarize`: the workflow report's summary table, from the files the stages wrote."""

from __future__ import annotations

import argparse

HELP = "summary table of a workflow run (particles, epochs, run times, resolutions, GT metrics)"
DESCRIPTION = """\
Gather the numbers a reader of the workflow report wants first: particles in, kept and removed by the
filter; for each training run its size, epochs, final losses and speed; the back-projection's
gold-standard resolution; ground-truth metrics (simulated data: junk-filter precision/recall/F1,
|Spearman rho|, ARI, per-image FSC); and the run time and peak memory of every job, from Snakemake's
benchmark files. Nothing is recomputed: each number is read from a stage's output. With --highres it
also gives the command that opens that run in the explorer (`drgn explore RUN`). Writes JSON, and an
HTML page (embedded in `snakemake --report`) and reStructuredText when asked.

Example:
  drgn summarize --table results/data/table.star --filter-dir results/filter \\
      --pilot results/pilot/z1 --pilot results/pilot/z10 --highres results/highres/train \\
      --backproject results/validation/backproject --metrics results/validation/metrics.json \\
      --benchmarks results/benchmarks -o results/report/summary.json --html results/report/summary.html
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", metavar="table.star", help="canonical particle table")
    parser.add_argument("--filter-dir", metavar="DIR",
                        help="output folder of drgn filter (kept.npy, filter.json)")
    parser.add_argument("--pilot", metavar="RUN", nargs="+", default=[], action="extend",
                        help="pilot training run folder(s)")
    parser.add_argument("--highres", metavar="RUN", help="high-resolution training run folder")
    parser.add_argument("--backproject", metavar="DIR", help="output folder of drgn backproject (fsc.json)")
    parser.add_argument("--metrics", metavar="metrics.json", action="append", default=[],
                        help="ground-truth metrics from drgn evaluate (repeatable)")
    parser.add_argument("--benchmarks", metavar="DIR",
                        help="Snakemake benchmark folder of this run (DIR/<stage>/<job>.tsv; the workflow's "
                             "is results/benchmarks)")
    parser.add_argument("--landscape", metavar="DIR", help="output folder of drgn landscape (a state table)")
    parser.add_argument("-o", "--output", required=True, metavar="summary.json", help="output JSON")
    parser.add_argument("--html", metavar="summary.html", help="also write the tables as an HTML page")
    parser.add_argument("--rst", metavar="summary.rst", help="also write the tables as reStructuredText")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from drgn_core.errors import InputError
    from drgn_core.io.atomic import refuse_overwrite_input
    from drgn_core.summary import SummaryInputs, build_summary, write_summary

    def folder(path: str | None) -> Path | None:
        if path is None:
            return None
        if not Path(path).is_dir():
            raise InputError("folder not found", path)
        return Path(path)

    inputs = SummaryInputs(
        table=Path(args.table) if args.table else None, filter_dir=folder(args.filter_dir),
        pilots=[folder(p) for p in args.pilot], highres=folder(args.highres),
        backproject=folder(args.backproject), metrics=[Path(m) for m in args.metrics],
        benchmarks=folder(args.benchmarks), landscape=folder(args.landscape))
    outputs = [args.output, args.html, args.rst]
    refuse_overwrite_input(outputs, [args.table, *args.metrics])
    summary = build_summary(inputs)
    write_summary(summary, args.output, args.html, args.rst)
    p = summary.get("particles", {})
    print(f"summary: {p.get('input', '?')} particles, {p.get('kept', '?')} kept; "
          f"{len(summary.get('training', []))} training runs; wrote {args.output}")
    return 0
