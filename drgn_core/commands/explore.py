"""`drgn explore`: the interactive latent-space explorer (a local web app)."""

from __future__ import annotations

import argparse

HELP = "explore a trained run's latent space in the browser: lasso, thresholds, maps, save and export"
DESCRIPTION = """\
Start a local web app over a trained run (and its drgn analyze folder, found beside it as analyze/):
scatter UMAP, PCA, z dimensions or any per-particle value (pose, shift, defocus, |z|, k-means label,
filter verdict, ground truth) against any other, coloured by any; lasso/box selections that add,
subtract and intersect; histogram thresholds over all particles; particle images and montages; maps
decoded on demand at a point, a selection's mean or a k-means centre, shown as an isosurface and saved as
.mrc; graph traversals; selections saved as index files (with a .json record) and exported for RELION or
cryoSPARC through drgn export. With a drgn landscape folder (found beside the run as landscape/, or
--landscape): particles coloured by landscape state, a state selected in one click (its exact
particles, as states/state_K/indices.npy), its mean map shown and saved, and the state exported.

The server listens on 127.0.0.1 and every request needs the token printed with the URL. On a cluster,
open the printed ssh -L tunnel from your own computer, then the URL. Stop it with Ctrl-C.

Outputs (in --out, default: explore/ beside the run folder): selections/NAME.ind.npy + .ind.txt +
NAME.json, exports/NAME/, volumes/NAME.mrc, traversals/NAME/.

Example:
  drgn explore results/highres/train
  drgn explore results/pilot/z8 --out my_selections --port 8890 --no-browser
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_DIR",
                        help="a drgn train run directory (z.npy, indices.npy, model.pt)")
    parser.add_argument("--out", metavar="DIR", help="where selections, exports and maps are written "
                        "(default: explore/ beside RUN_DIR)")
    parser.add_argument("--analysis", metavar="DIR", help="drgn analyze folder (default: analyze/ beside "
                        "RUN_DIR, when it analysed this run)")
    parser.add_argument("--table", metavar="table.star", help="canonical table (default: the one the run's "
                        "config.yaml records); gives pose/CTF columns, images and export")
    parser.add_argument("--filter", metavar="DIR", dest="filter_dir",
                        help="drgn filter folder whose kept.npy becomes the filter_kept column "
                        "(default: ../../filter from RUN_DIR, the workflow layout)")
    parser.add_argument("--landscape", metavar="DIR",
                        help="drgn landscape folder of the run: colour by and select its states, show their "
                        "mean maps (default: ../landscape from RUN_DIR when it names this run)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: "
                        "only this machine; reach it from elsewhere through the printed ssh tunnel)")
    parser.add_argument("--port", type=int, default=8888, help="port (default 8888; 0 = any free port)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    parser.add_argument("--device", default="auto", help="device for decoding maps: auto, cpu, cuda, cuda:1")
    parser.add_argument("--display-D", type=int, default=64, dest="display_D", metavar="D",
                        help="largest box at which maps are decoded for viewing (default 64; 0 = the run's "
                        "full box); saved .mrc maps always have the run's full box")
    parser.add_argument("--max-points", type=int, default=200_000, metavar="N",
                        help="points drawn in the browser (a random subsample; counts, thresholds and "
                        "selections always use all particles; default 200000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn subsample and montages")
    parser.add_argument("--exit-after", type=float, default=None, metavar="S",
                        help="stop by itself after S seconds (for scripts and tests)")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")


def run(args: argparse.Namespace) -> int:
    import getpass
    import socket
    import sys
    import threading
    import webbrowser
    from pathlib import Path

    from drgn_core.errors import InputError
    from drgn_core.explore import runlink
    from drgn_core.explore.data import load_explore_data, stderr_log
    from drgn_core.explore.server import Explorer, make_server, url_of

    if args.max_points < 1:
        raise InputError(f"--max-points must be at least 1, got {args.max_points}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must lie in 0 … 65535, got {args.port}")
    data = load_explore_data(args.run, analysis=args.analysis, table=args.table, filter_dir=args.filter_dir,
                             max_points=args.max_points, seed=args.seed, log=stderr_log,
                             landscape=args.landscape)
    out = Path(args.out) if args.out else Path(args.run).resolve().parent / "explore"
    device = str(runlink.resolve_device(args.device))
    if args.display_D < 0 or args.display_D % 2:
        raise InputError(f"--display-D must be an even box size (or 0), got {args.display_D}")
    app = Explorer(data, out, device=device, seed=args.seed, display_D=args.display_D or None)
    srv = make_server(app, args.host, args.port, verbose=args.verbose)
    url = url_of(srv, app)
    port = srv.server_address[1]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine and has the token can "
              "read this run", file=sys.stderr)
    print(f"drgn explore: serving {data.n} particles of {data.run_dir} (outputs to {out})", flush=True)
    print(f"  open: {url}", flush=True)
    print(f"  from your computer: ssh -N -L {port}:127.0.0.1:{port} {getpass.getuser()}@{socket.getfqdn()}"
          f"   then open the URL above", flush=True)
    print("  stop: Ctrl-C", flush=True)
    timer = None
    if args.exit_after is not None:
        timer = threading.Timer(args.exit_after, srv.shutdown)
        timer.daemon = True
        timer.start()
    if not args.no_browser:
        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("drgn explore: stopped", file=sys.stderr)
    finally:
        if timer is not None:
            timer.cancel()
        srv.server_close()
    return 0
