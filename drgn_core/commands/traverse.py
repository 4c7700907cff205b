"""`drgn traverse`: trajectories through latent space (graph traversal, PC lines, straight lines)."""

from __future__ import annotations

import argparse

HELP = "latent-space trajectories: graph traversal through anchors, PC traversal, or straight lines"
DESCRIPTION = """\
Build a trajectory through a run's latent space and generate volumes along it.

--method graph (default; the paper's Methods): a neighbour graph on the particles' latents — an edge
  where the distance is below the threshold that makes the average number of neighbours --avg-neighbors
  (5), each node keeping at most its --max-neighbors (10) nearest — and Dijkstra's shortest path through
  the anchors in order. Every point of the path is a particle. The threshold is estimated from a random
  sample of rows against all particles (exact below 1,000 particles); the neighbour search is an exact
  batched torch search (GPU when present), or NN-descent on a CPU above 50,000 particles.
--method pc: --n points along PC --pc between its 5th and 95th percentiles (z = mean + t·PC).
--method linear: straight lines between consecutive anchors, --n points per segment.

Anchors: --anchors i,j,k (canonical table rows, visited in that order), --anchors-file FILE (.npy/.txt of
rows, e.g. analyze's kmeans20/centers_ind.npy) or --kmeans K (on-data k-means centres — for --method
graph the particle nearest each centre within the graph's largest connected component, so a path
exists — ordered starting from the one with the lowest PC1, then always to the nearest unvisited one).

Outputs: path_ind.npy/.txt (graph: canonical rows visited), z_path.txt, path.png (on PC1/PC2),
volumes/vol_NNN.mrc + z_values.txt (at most --max-volumes, spread evenly along the path, ends included),
volumes/maps.png (central slices and projections of every map, one row per map), traverse.json. If two
consecutive anchors lie in different parts of the graph the command stops with an error naming them.

Examples:
  drgn traverse results/highres/train -o results/traverse --anchors 1021,5530,80412
  drgn traverse results/highres/train -o results/traverse_km --kmeans 20 --max-volumes 40
  drgn traverse results/highres/train -o results/pc1 --method pc --pc 1 --n 10
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory of drgn train")
    p.add_argument("-o", "--outdir", required=True, help="output folder (replaced whole)")
    p.add_argument("--method", default="graph", choices=("graph", "pc", "linear"))
    p.add_argument("--anchors", help="comma-separated canonical table rows, in path order")
    p.add_argument("--anchors-file", help=".npy or .txt of canonical table rows, in path order")
    p.add_argument("--kmeans", type=int, metavar="K", help="use on-data k-means centres as anchors")
    p.add_argument("--seed", type=int, default=0, help="seed for k-means and the threshold sample")
    p.add_argument("--avg-neighbors", type=float, default=5.0, help="average degree that sets the threshold")
    p.add_argument("--max-neighbors", type=int, default=10, help="edges kept per node (default 10)")
    p.add_argument("--pc", type=int, default=1, help="PC for --method pc (1-based, default 1)")
    p.add_argument("--n", type=int, default=10, dest="n_points",
                   help="points for --method pc, per segment for --method linear (default 10)")
    p.add_argument("--max-volumes", type=int, default=50, help="at most this many volumes (default 50)")
    p.add_argument("--skip-volumes", action="store_true", help="write the path only")
    p.add_argument("-D", type=int, dest="D", help="box size of the volumes (default: the training box)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (neighbour search and volumes)")


def run(args: argparse.Namespace) -> int:
    from drgn_core.errors import DrgnError
    from drgn_core.io.indices import read_index_file
    from drgn_core.traversal import TraverseOptions, traverse

    anchors = None
    if args.anchors and args.anchors_file:
        raise DrgnError("give --anchors or --anchors-file, not both")
    if args.anchors:
        try:
            anchors = [int(t) for t in args.anchors.split(",") if t.strip()]
        except ValueError:
            raise DrgnError(f"--anchors: expected comma-separated table rows, got {args.anchors!r}") from None
    elif args.anchors_file:
        anchors = read_index_file(args.anchors_file).tolist()  # in file order
    opts = TraverseOptions(method=args.method, anchors=anchors, kmeans=args.kmeans, seed=args.seed,
                           avg_neighbors=args.avg_neighbors, max_neighbors=args.max_neighbors, pc=args.pc,
                           n_points=args.n_points, max_volumes=args.max_volumes,
                           skip_volumes=args.skip_volumes, D=args.D, device=args.device)
    s = traverse(args.run, args.outdir, opts)
    n = s.get("path_length", len(s.get("t", [])) or None)
    print(f"{args.method} path" + (f" of {n} points" if n else "") + f" → {args.outdir}")
    return 0
