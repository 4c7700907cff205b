"""Benchmark: latent-space analysis at 10⁶ particles — PCA, k-means (k = 20) with on-data centres, UMAP
(fit on a 100,000 subsample + transform of the rest) and graph traversal (threshold, neighbour graph,
Dijkstra through k-means anchors) on random 10-D latents drawn from a mixture of overlapping clusters.

Times each stage and the total (target: ≤ 5 min on 2 CPU cores), and measures the recall of the
approximate neighbour search (NN-descent, used on a CPU above 50,000 particles) against an exact
brute-force search for a random sample of query particles. Prints JSON.

Run: .venv/bin/python bench/analysis_scale.py [--n 1000000] [--zdim 10] [--clusters 12] [--threads 2]
     [--skip-umap] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch


def mixture(n: int, zdim: int, k: int, seed: int) -> np.ndarray:
    """n latents from k Gaussian clusters of unequal sizes and widths whose centres overlap a little
    (spacing ≈ 2 widths), like a trained latent space with several states and transitions between them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, zdim)) * 1.5
    weights = rng.dirichlet(np.full(k, 2.0))
    lab = rng.choice(k, size=n, p=weights)
    widths = rng.uniform(0.5, 1.0, k)
    return (centres[lab] + widths[lab, None] * rng.normal(size=(n, zdim))).astype(np.float32)


def knn_recall(z: np.ndarray, nbr: np.ndarray, queries: int, seed: int, device: str) -> float:
    """Fraction of the true k nearest neighbours (exact brute force for a random sample of particles)
    that the graph's neighbour lists hold."""
    from drgn_core.rundir import resolve_device

    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(len(z), queries, replace=False))
    dev = resolve_device(device)
    zt = torch.from_numpy(z).to(dev)
    q_ids = torch.from_numpy(q).to(dev)
    k = nbr.shape[1]
    best = torch.full((queries, k), float("inf"), device=dev)
    best_i = torch.zeros((queries, k), dtype=torch.int64, device=dev)
    for a in range(0, len(z), 65536):
        d = torch.cdist(zt[q_ids], zt[a:a + 65536])
        d[q_ids[:, None] == torch.arange(a, a + d.shape[1], device=dev)[None]] = float("inf")  # not itself
        v, i = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
        cd, ci = torch.cat([best, v], 1), torch.cat([best_i, i + a], 1)
        best, pos = torch.topk(cd, k, dim=1, largest=False)
        best_i = torch.gather(ci, 1, pos)
    truth = best_i.cpu().numpy()
    return float(np.mean([len(set(t) & set(nbr[r])) / k for t, r in zip(truth, q)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--zdim", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-umap", action="store_true")
    ap.add_argument("--recall-queries", type=int, default=1000)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from drgn_core import analysis, rundir, traversal

    z = mixture(args.n, args.zdim, args.clusters, args.seed)
    times: dict[str, float] = {}
    out: dict = {"n": args.n, "zdim": args.zdim, "clusters": args.clusters, "threads": args.threads,
                 "device": str(rundir.resolve_device(args.device)), "cpu": platform.processor() or None}
    t_all = time.perf_counter()

    t = time.perf_counter()
    pca = analysis.fit_pca(z)
    pc = pca.transform(z)
    times["pca_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _, centres = analysis.kmeans(z, 20, seed=args.seed)
    rows = analysis.nearest_rows(z, centres)
    times["kmeans20_s"] = time.perf_counter() - t

    if not args.skip_umap:
        t = time.perf_counter()
        um = analysis.run_umap(z, seed=args.seed)
        times["umap_s"] = time.perf_counter() - t
        out["umap"] = um.info

    t = time.perf_counter()
    g = traversal.build_graph(z, seed=args.seed, device=args.device)
    times["graph_build_s"] = time.perf_counter() - t
    for stage, sec in g.info["seconds"].items():
        times[f"  graph_{stage}_s"] = sec
    from scipy.sparse.csgraph import connected_components

    _, comp = connected_components(g.adjacency, directed=False)
    giant = np.argmax(np.bincount(comp))
    anchors = rows[traversal.order_anchors(z[rows], pc[rows, 0])]
    anchors = [int(a) for a in anchors if comp[a] == giant]
    t = time.perf_counter()
    path, cum = traversal.graph_path(g, anchors)
    times["dijkstra_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t_all
    out["graph"] = {k: v for k, v in g.info.items() if k != "threshold_estimate"}
    out["graph"]["giant_component_fraction"] = float(np.mean(comp == giant))
    out["path"] = {"anchors_in_giant_component": len(anchors), "length": len(path),
                   "distance": float(cum[-1])}

    t = time.perf_counter()
    out["neighbour_recall_at_10"] = knn_recall(z, g.neighbors, args.recall_queries, args.seed, args.device)
    times["recall_check_s (not in total)"] = time.perf_counter() - t
    out["times"] = {k: round(v, 2) for k, v in times.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
