"""`drgn fetch`: an EMPIAR entry (or chosen files of it), or one published URL, resumably into a folder."""

from __future__ import annotations

import argparse
import re

HELP = "fetch an EMPIAR entry (or the files of it you name) or a checksummed URL, resumably"
DESCRIPTION = """\
Fetch an EMPIAR entry's files into a folder: the entry's metadata from the EMPIAR REST API, the file
list from its HTTPS directory listing (only folders the --include globs can reach are walked), then
parallel Range requests over at most --connections connections (EBI throttles above about 8): the limit
holds for every request of the process, the API call, listings, size probes and retries included. A 503
or a dropped connection is retried with back-off, keeping every byte received. A second drgn fetch into
the same folder waits for the first (a lock on the folder, released however the first one ends). Every
file resumes after any interruption (kill -9 included) from a progress index beside its `.NAME.part`; a
file gets its name only when complete: its
size equals the server's and, for .mrc/.mrcs, its header implies exactly that size. Its sha256 then goes
into drgn-fetch-manifest.json and is checked on later runs, so re-running a finished fetch is a cheap
no-op that also catches a file changed on disk (--repair fetches such files again).

--stacks-of FILE (a particle file inside -o, fetched by this run or an earlier one) makes the listing
optional: once FILE is in, every stack it names that the importer would not find (resolved as `drgn
import` does, with --stacks-datadir as its --datadir) is fetched by its exact path in the entry, and the
fetch fails, naming the stack and the URLs tried, while any is absent. --include may then name the
particle file alone.

A URL instead of an accession fetches that one file and checks it against --checksum (sha256:HEX or
git:HEX, a git blob id as GitHub lists it): the paper's input files are published that way.

Base URLs: --api-base / $DRGN_EMPIAR_API (default https://www.ebi.ac.uk/empiar/api) and --data-base /
$DRGN_EMPIAR_DATA (default https://ftp.ebi.ac.uk/empiar/world_availability; a mirror such as PDBj's works).

Examples:
  drgn fetch EMPIAR-10076 -o data/10076 --include 'data/Parameters.star' 'data/L17*' --dry-run
  drgn fetch EMPIAR-10076 -o data/10076 --include 'data/Parameters.star' 'data/L17*'
  drgn fetch EMPIAR-10076 -o data/10076 --include data/Parameters.star \
      --stacks-of data/10076/data/Parameters.star
  drgn fetch https://example.org/inputs/poses.cs --checksum git:0123456789abcdef0123456789abcdef01234567 -o in
"""


def _size(text: str) -> int:
    m = re.fullmatch(r"(?i)\s*(\d+)\s*([kmg]?)i?b?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 65536, 256K or 8M")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="an EMPIAR accession (EMPIAR-10076 or 10076), or an http(s) URL")
    parser.add_argument("-o", "--output", required=True, help="folder to fetch into (created; files keep "
                        "their path relative to the entry, e.g. data/Parameters.star)")
    parser.add_argument("--include", nargs="+", default=[], metavar="GLOB",
                        help="only files matching these globs, relative to the entry (e.g. 'data/L17*'; "
                        "`*` also crosses folders); default: the whole entry")
    parser.add_argument("--checksum", help="for a URL source: expected sha256:HEX or git:HEX (git blob id)")
    parser.add_argument("--name", help="for a URL source: file name to save as (default: the URL's)")
    parser.add_argument("--stacks-of", metavar="FILE",
                        help="a particle file (.star, .cs, .txt; a local path, normally inside -o): after "
                        "the included files, fetch every stack it names that is not on disk, by exact path; "
                        "fail while one is absent")
    parser.add_argument("--stacks-datadir", metavar="DIR",
                        help="with --stacks-of: the folder its stack paths are relative to, as `drgn import "
                        "--datadir` (default: the particle file's folder)")
    parser.add_argument("--dry-run", action="store_true", help="list the files, their sizes and the total; "
                        "fetch nothing")
    parser.add_argument("--connections", type=int, default=8, help="parallel connections in all (default 8, "
                        "EBI's throttling threshold)")
    parser.add_argument("--chunk-size", type=_size, default=8 << 20, help="largest Range request "
                        "(default 8M; a file smaller than 16 requests per connection is cut finer, down to "
                        "256K; a partial file keeps the chunking it was started with)")
    parser.add_argument("--retries", type=int, default=8, help="retries of a request that makes no "
                        "progress (default 8)")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled "
                        "each time up to 60 (default 1)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a "
                        "connection counts as dropped (default 60)")
    parser.add_argument("--no-verify", action="store_true", help="trust files already in the manifest "
                        "by size alone (skips re-hashing them on a re-run)")
    parser.add_argument("--repair", action="store_true", help="fetch again files that changed on disk since "
                        "they were fetched (default: report them and stop)")
    parser.add_argument("--api-base", help="EMPIAR API base URL (default: $DRGN_EMPIAR_API or EBI's)")
    parser.add_argument("--data-base", help="EMPIAR data base URL (default: $DRGN_EMPIAR_DATA or EBI's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from drgn_core.errors import DrgnError
    from drgn_core.fetch import api
    from drgn_core.fetch.connections import LIMIT
    from drgn_core.fetch.download import FetchOptions, fetch_files, probe_sizes
    from drgn_core.fetch.plan import env_or, plan_entry, plan_url
    from drgn_core.fetch.verify import Manifest, parse_checksum

    if args.connections < 1:
        raise DrgnError(f"--connections {args.connections}: need at least 1")
    opts = FetchOptions(connections=args.connections, chunk_size=args.chunk_size, retries=args.retries,
                        backoff=args.backoff, timeout=args.timeout, progress=not args.quiet,
                        verify_existing=not args.no_verify, repair=args.repair)
    LIMIT.set(args.connections)  # before the API call and the listing: they count too
    if args.source.startswith(("http://", "https://")):
        if not args.checksum:
            raise DrgnError(f"{args.source}: a URL needs --checksum sha256:HEX or git:HEX (nothing "
                            "unverified is fetched)")
        if args.include:
            raise DrgnError("--include applies to an EMPIAR accession, not to a URL")
        files = [plan_url(args.source, parse_checksum(args.checksum), args.name)]
        label = args.source
    else:
        if args.checksum or args.name:
            raise DrgnError("--checksum and --name apply to a URL source, not to an accession")
        data_base = env_or(args.data_base, "DRGN_EMPIAR_DATA", api.DEFAULT_DATA_BASE)
        entry, files = plan_entry(args.source,
                                  args.include,
                                  env_or(args.api_base, "DRGN_EMPIAR_API", api.DEFAULT_API_BASE),
                                  data_base, opts, walk_all=not args.stacks_of)
        label = f"{entry.accession} ({entry.title})" if entry.title else entry.accession
    if args.stacks_datadir and not args.stacks_of:
        raise DrgnError("--stacks-datadir goes with --stacks-of")
    if args.dry_run:
        manifest = Manifest(args.output)
        for f in files:
            rec = manifest.files.get(f.rel)
            f.size = rec["size"] if rec else None
        probe_sizes([f for f in files if f.size is None], opts)
        width = max((len(f.rel) for f in files), default=0)
        for f in files:
            state = "have" if f.rel in manifest.files else "get"
            print(f"{state}  {f.rel:<{width}}  {f.size:>15,d}  {_human(f.size)}")
        total = sum(f.size for f in files)
        missing = sum(f.size for f in files if f.rel not in manifest.files)
        print(f"{_files(len(files))}, {total:,d} bytes ({_human(total)}) in all; {_human(missing)} to fetch "
              f"into {args.output}")
        return 0
    summary = fetch_files(files, args.output, opts) if files else _nothing()
    if args.stacks_of:
        if args.source.startswith(("http://", "https://")):
            raise DrgnError("--stacks-of applies to an EMPIAR accession, not to a URL")
        from drgn_core.fetch.referenced import absent_error, plan_referenced

        root = f"{data_base.rstrip('/')}/{entry.number}/"
        more, absent = plan_referenced(args.stacks_of, args.output, args.stacks_datadir, root, opts)
        if more:
            extra = fetch_files(more, args.output, opts)
            for key in ("files", "fetched", "bytes_total", "bytes_fetched", "skipped"):
                summary[key] += extra[key]
        if absent:
            raise absent_error(absent)
    print(f"{label}: {_files(summary['files'])} ({_human(summary['bytes_total'])}) in {args.output}; "
          f"{summary['fetched']} fetched ({_human(summary['bytes_fetched'])} transferred), "
          f"{summary['skipped']} already complete and verified.")
    return 0


def _nothing() -> dict:
    return {"files": 0, "skipped": 0, "fetched": 0, "bytes_total": 0, "bytes_fetched": 0}


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
