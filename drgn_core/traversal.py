"""Trajectories through latent space (`drgn traverse`): graph traversal, PC lines, straight lines.

Graph traversal follows the paper's Methods: a neighbour graph on the particles' latents where i and j
are linked when their Euclidean distance is below a threshold t chosen so that the AVERAGE number of
neighbours is 5, each node then pruned to at most its 10 nearest neighbours; Dijkstra's algorithm finds
the shortest path through consecutive anchors, and volumes are generated at the visited particles, so
every frame of the movie sits on data.

How it scales to 10⁶ particles:

- The threshold. The average degree at t is the mean over nodes of #{j ≠ i : d(i, j) < t}. It is
  estimated from a sample of pairwise distances — 1,000 random rows against 200,000 random columns by
  default, exact when N is at most both — so the cost is bounded instead of N²
  (`distance_threshold`).
- The neighbours. Each node needs only its `max_neighbors` nearest (then those closer than t).
  Exact search is a batched brute force in torch (squared distances by matrix product, running top-k
  over column blocks), on the GPU when present. On a CPU above `exact_max` particles (50,000 by
  default) brute force is O(N²) — hours at 10⁶ on two cores — so the neighbours come from NN-descent
  (pynndescent, already installed with umap-learn; seeded), an approximate k-NN graph whose recall
  on such data is typically above 0.95; `bench/analysis_scale.py` measures it.
- Dijkstra runs on the sparse graph (scipy.sparse.csgraph), O(E log N) per anchor pair.

Edges are stored once per node (its ≤ max_neighbors nearest within t) and Dijkstra treats them as
undirected (distances are symmetric): a path may use an edge that only one of its two ends kept.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError
from drgn_core.io.indices import write_index_files
from drgn_core.plots import even_subsample
from drgn_core.rundir import load_run, resolve_device, write_volumes

AVG_DEGREE = 5.0
MAX_NEIGHBORS = 10
THRESHOLD_SAMPLE = 1000
THRESHOLD_COLUMNS = 200_000
EXACT_MAX_CPU = 50_000


def _block(n_rows: int, budget: int = 1 << 24) -> int:
    """Column block so one (n_rows × block) float32 distance matrix stays near 64 MB."""
    return max(1024, budget // max(n_rows, 1))


def _ranked_block(q, q_ids, x, x_sq, start: int):
    """|x_j|² − 2 q_i·x_j for a block of columns starting at global row `start`: the squared distance
    minus |q_i|², which orders each row exactly like the distance, in one fused matrix product (a third
    of the memory passes of the full formula). A query's own column is set to +inf."""
    import torch

    d = torch.addmm(x_sq[None, :], q, x.T, alpha=-2.0)
    own = (q_ids >= start) & (q_ids < start + x.shape[0])
    d[own.nonzero().squeeze(1), q_ids[own] - start] = float("inf")
    return d


# ---- threshold --------------------------------------------------------------------------------------------
def distance_threshold(z: np.ndarray, avg_degree: float = AVG_DEGREE, sample: int = THRESHOLD_SAMPLE,
                       seed: int = 0, device: str = "auto",
                       col_sample: int = THRESHOLD_COLUMNS) -> tuple[float, dict]:
    """Distance t at which the average number of neighbours (j ≠ i, d < t) is `avg_degree`.

    Estimated from the distances between `sample` random rows and `col_sample` random columns (exact
    when N is at most both): a row meets each other particle among the columns with probability
    M_i/(N-1), so the pairs below t number avg_degree · Σ_i M_i/(N-1) in expectation, and t is the
    distance that many pairs fall below. The defaults count ~1,000 pairs at 10⁶ particles (a few percent
    error in the degree, far less in t: in d dimensions the degree grows like t^d).
    Each row keeps its L smallest distances; should any row hold L values below t (t might then be too
    low) L doubles and the pass repeats.
    """
    import torch

    n = len(z)
    if n < 2:
        raise InputError(f"a latent graph needs at least 2 particles, got {n}")
    if avg_degree >= n - 1:
        return float("inf"), {"sample_rows": n, "sample_columns": n, "exact": True}
    dev = resolve_device(device)
    rng = np.random.default_rng(seed)
    rows = np.arange(n) if n <= sample else np.sort(rng.choice(n, sample, replace=False))
    cols = np.arange(n) if n <= col_sample else np.sort(rng.choice(n, col_sample, replace=False))
    m = len(rows)
    own = np.isin(rows, cols)                               # rows that meet themselves among the columns
    target = round(avg_degree * float(np.sum(len(cols) - own.astype(np.int64))) / (n - 1))
    target = max(target, 1)
    zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(dev)
    zc = zt[torch.from_numpy(cols).to(dev)]
    zc_sq = (zc * zc).sum(1)
    row_ids = torch.from_numpy(rows).to(dev)
    # a row's position among the columns (or -1): `_ranked_block` masks it like a particle's own column
    pos = torch.from_numpy(np.where(own, np.searchsorted(cols, rows), -1)).to(dev)
    q = zt[row_ids]
    q_sq = (q * q).sum(1)
    L = min(len(cols), max(64, int(4 * avg_degree)))
    blk = _block(m)
    while True:
        best = torch.full((m, L), float("inf"), device=dev)
        for a in range(0, len(cols), blk):
            d = _ranked_block(q, pos, zc[a:a + blk], zc_sq[a:a + blk], a)
            kk = min(L, d.shape[1])
            cand = torch.cat([best, torch.topk(d, kk, dim=1, largest=False).values], dim=1)
            best = torch.topk(cand, L, dim=1, largest=False).values
        best_sq = torch.clamp(best + q_sq[:, None], min=0.0)
        finite = torch.sort(best_sq.flatten()).values
        finite = finite[torch.isfinite(finite)]
        if target >= len(finite):
            t2 = float(finite[-1]) * (1 + 1e-6) + 1e-12
        else:
            t2 = 0.5 * (float(finite[target - 1]) + float(finite[target]))
        saturated = bool((best_sq[:, -1] < t2).any()) and L < len(cols)
        if not saturated:
            break
        L = min(len(cols), 2 * L)
    return float(np.sqrt(t2)), {"sample_rows": m, "sample_columns": len(cols),
                                "exact": m == n and len(cols) == n, "pairs_below": target, "per_row_kept": L}


# ---- neighbours -------------------------------------------------------------------------------------------
def knn_exact(z: np.ndarray, k: int, device: str = "auto",
              query_block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other particles of every particle by batched brute force in torch
    → (indices (N, k) int64, distances (N, k) float32), nearest first.

    Candidates are ranked by one fused matrix product per block (`_ranked_block`); the selected pairs'
    distances are then recomputed directly from the coordinates, so stored values carry no cancellation
    error.
    """
    import torch

    from drgn_core.progress import progress_bar

    n = len(z)
    k = min(k, n - 1)
    dev = resolve_device(device)
    zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(dev)
    z_sq = (zt * zt).sum(1)
    out_i = np.empty((n, k), dtype=np.int64)
    blk = _block(query_block)
    for a in progress_bar(range(0, n, query_block), desc="neighbours", unit="block", file=sys.stderr,
                  disable=n <= 4 * query_block):
        q = zt[a:a + query_block]
        qi = torch.arange(a, a + len(q), device=dev)
        best_d = torch.full((len(q), k), float("inf"), device=dev)
        best_i = torch.zeros((len(q), k), dtype=torch.int64, device=dev)
        for c in range(0, n, blk):
            d = _ranked_block(q, qi, zt[c:c + blk], z_sq[c:c + blk], c)
            kk = min(k, d.shape[1])
            v, i = torch.topk(d, kk, dim=1, largest=False)
            cd, ci = torch.cat([best_d, v], 1), torch.cat([best_i, i + c], 1)
            best_d, pos = torch.topk(cd, k, dim=1, largest=False)
            best_i = torch.gather(ci, 1, pos)
        out_i[a:a + len(q)] = best_i.cpu().numpy()
    return out_i, _pair_dists(z, out_i)


def knn_nndescent(z: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k nearest other particles by NN-descent (pynndescent), for large N on a CPU.

    Same output as `knn_exact`. The particle itself is dropped from its own list by index (duplicates
    of it at distance 0 stay, as in the exact search).
    """
    from pynndescent import NNDescent

    n = len(z)
    k = min(k, n - 1)
    index = NNDescent(np.ascontiguousarray(z, dtype=np.float32), n_neighbors=k + 1, random_state=seed,
                      low_memory=True, verbose=False)
    nbr, _ = index.neighbor_graph
    nbr = np.asarray(nbr, dtype=np.int64)
    self_hit = nbr == np.arange(n)[:, None]          # at most once per row: a row's entries are distinct
    has_self = self_hit.any(axis=1)
    out = np.empty((n, k), dtype=np.int64)
    out[has_self] = nbr[has_self][~self_hit[has_self]].reshape(-1, k)
    out[~has_self] = nbr[~has_self, :k]
    unfilled = out < 0                                  # NN-descent pads slots it could not fill with -1
    out[unfilled] = np.nonzero(unfilled)[0]             # point them at the row itself: dropped below
    d = _pair_dists(z, out)
    d[out == np.arange(n)[:, None]] = np.inf
    order = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(out, order, 1), np.take_along_axis(d, order, 1)


def _pair_dists(z: np.ndarray, nbr: np.ndarray, chunk: int = 262_144) -> np.ndarray:
    """Euclidean distances ‖z_i − z_nbr[i, j]‖ (float32), chunked to bound memory."""
    out = np.empty(nbr.shape, dtype=np.float32)
    for a in range(0, len(nbr), chunk):
        diff = z[nbr[a:a + chunk]] - z[a:a + chunk, None, :]
        out[a:a + chunk] = np.sqrt((diff.astype(np.float64) ** 2).sum(-1))
    return out


# ---- the graph --------------------------------------------------------------------------------------------
@dataclass
class LatentGraph:
    """Sparse neighbour graph over the run's particles (rows of z), edge weights = distances."""

    adjacency: object            # scipy.sparse.csr_matrix (N, N)
    threshold: float
    info: dict = field(default_factory=dict)
    neighbors: np.ndarray | None = None   # (N, max_neighbors) nearest rows found, before the threshold


def build_graph(z: np.ndarray, avg_degree: float = AVG_DEGREE, max_neighbors: int = MAX_NEIGHBORS,
                seed: int = 0, device: str = "auto", sample: int = THRESHOLD_SAMPLE,
                exact_max: int = EXACT_MAX_CPU) -> LatentGraph:
    """The paper's latent graph: edges closer than t (average degree `avg_degree`), at most
    `max_neighbors` per node. See the module docstring for how each step scales."""
    import time

    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    z = np.ascontiguousarray(z, dtype=np.float32)
    n = len(z)
    if max_neighbors < 1 or avg_degree <= 0:
        raise InputError(f"need max_neighbors >= 1 and avg_degree > 0, got {max_neighbors} and {avg_degree}")
    t0 = time.perf_counter()
    t, tinfo = distance_threshold(z, avg_degree, sample=sample, seed=seed, device=device)
    t1 = time.perf_counter()
    dev = resolve_device(device)
    exact = dev.type == "cuda" or n <= exact_max
    nbr, dist = knn_exact(z, max_neighbors, device=device) if exact else knn_nndescent(z, max_neighbors, seed)
    t2 = time.perf_counter()
    keep = dist < t
    rows = np.repeat(np.arange(n), nbr.shape[1])[keep.ravel()]
    cols, w = nbr.ravel()[keep.ravel()], dist.ravel()[keep.ravel()].astype(np.float64)
    # scipy's graphs treat a stored 0 as "no edge": a duplicate latent keeps its edge with a tiny weight
    w = np.maximum(w, 1e-12)
    adj = csr_matrix((w, (rows, cols)), shape=(n, n))
    sym = adj.maximum(adj.T)
    n_comp, _ = connected_components(sym, directed=False)
    info = {"n_nodes": n, "avg_degree_target": avg_degree, "max_neighbors": max_neighbors,
            "threshold": t, "threshold_estimate": tinfo, "search": "exact" if exact else "nndescent",
            "device": str(dev), "n_edges": int(sym.nnz // 2), "mean_degree": float(sym.nnz / n),
            "connected_components": int(n_comp), "seed": seed,
            "seconds": {"threshold": round(t1 - t0, 3), "neighbours": round(t2 - t1, 3),
                        "graph": round(time.perf_counter() - t2, 3)}}
    return LatentGraph(adj, t, info, nbr)


class DisconnectedAnchors(InputError):
    """Two consecutive anchors lie in different connected components of the latent graph."""


def graph_path(graph: LatentGraph, anchors: list[int],
               names: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shortest path (Dijkstra) visiting `anchors` (rows of z) in order → (rows (L,), cumulative
    distance along the path (L,)). Consecutive anchors that are not connected raise DisconnectedAnchors
    naming both (by `names`, e.g. canonical table rows, when given)."""
    from scipy.sparse.csgraph import dijkstra

    names = names if names is not None else anchors
    path: list[int] = [int(anchors[0])]
    cum: list[float] = [0.0]
    for s, (a, b) in enumerate(itertools.pairwise(anchors)):
        dist, pred = dijkstra(graph.adjacency, directed=False, indices=int(a), return_predecessors=True)
        if not np.isfinite(dist[b]):
            sizes = _component_sizes(graph, [int(a), int(b)])
            raise DisconnectedAnchors(
                f"anchors {names[s]} and {names[s + 1]} (table rows) are not connected in the latent graph "
                f"(their components hold {sizes[0]} and {sizes[1]} particles; "
                f"{graph.info.get('connected_components')} components at threshold {graph.threshold:.4g}); "
                "choose anchors in one component, raise --avg-neighbors, or use --method linear")
        seg = [int(b)]
        while seg[-1] != a:
            seg.append(int(pred[seg[-1]]))
        seg.reverse()
        base = cum[-1]
        path.extend(seg[1:])
        cum.extend((base + dist[np.array(seg[1:], dtype=np.int64)]).tolist())
    return np.array(path, dtype=np.int64), np.array(cum, dtype=np.float64)


def _component_sizes(graph: LatentGraph, nodes: list[int]) -> list[int]:
    """Number of particles in the connected component of each node (for error messages)."""
    from scipy.sparse.csgraph import connected_components

    _, comp = connected_components(graph.adjacency, directed=False)
    counts = np.bincount(comp)
    return [int(counts[comp[v]]) for v in nodes]


# ---- anchors and other trajectories -----------------------------------------------------------------------
def order_anchors(z_anchors: np.ndarray, pc1: np.ndarray) -> np.ndarray:
    """Order for anchors that have no given order (k-means centres): start at the anchor with the
    smallest PC1 coordinate (one end of the data's main axis of variation) and repeatedly move to the
    nearest anchor not yet visited. Returns a permutation of range(len(z_anchors))."""
    z_anchors = np.asarray(z_anchors, dtype=np.float64)
    order = [int(np.argmin(pc1))]
    left = set(range(len(z_anchors))) - set(order)
    while left:
        cand = np.array(sorted(left))
        d = np.linalg.norm(z_anchors[cand] - z_anchors[order[-1]], axis=1)
        nxt = int(cand[np.argmin(d)])
        order.append(nxt)
        left.remove(nxt)
    return np.array(order, dtype=np.int64)


def linear_path(z_anchors: np.ndarray, n: int) -> np.ndarray:
    """Straight lines between consecutive anchors, n points per segment (ends included, joins once)."""
    if n < 2:
        raise InputError(f"a linear path needs at least 2 points per segment, got {n}")
    z_anchors = np.asarray(z_anchors, dtype=np.float64)
    s = np.linspace(0.0, 1.0, n)[:, None]
    segs = [z_anchors[i] + s * (z_anchors[i + 1] - z_anchors[i]) for i in range(len(z_anchors) - 1)]
    pts = [segs[0]] + [seg[1:] for seg in segs[1:]]
    return np.concatenate(pts).astype(np.float32)


def map_rows(indices: np.ndarray, canonical: list[int], what: str = "anchor",
             path: str | os.PathLike | None = None) -> np.ndarray:
    """Canonical table rows → rows of the run's z (error naming any row the run did not train on)."""
    pos = {int(r): i for i, r in enumerate(indices)}
    missing = [r for r in canonical if int(r) not in pos]
    if missing:
        raise InputError(f"{what} table row(s) {', '.join(map(str, missing[:10]))} are not among the run's "
                         f"{len(indices)} particles (its indices.npy)", path)
    return np.array([pos[int(r)] for r in canonical], dtype=np.int64)


# ---- the command ------------------------------------------------------------------------------------------
@dataclass
class TraverseOptions:
    method: str = "graph"                 # graph | pc | linear
    anchors: list[int] | None = None      # canonical table rows, in order
    kmeans: int | None = None             # or: on-data k-means centres as anchors (ordered by order_anchors)
    seed: int = 0
    avg_neighbors: float = AVG_DEGREE
    max_neighbors: int = MAX_NEIGHBORS
    pc: int = 1                           # 1-based PC for --method pc
    n_points: int = 10                    # points for pc, per segment for linear
    max_volumes: int | None = 50
    skip_volumes: bool = False
    D: int | None = None
    device: str = "auto"
    sample: int = THRESHOLD_SAMPLE
    exact_max: int = EXACT_MAX_CPU


def _anchor_rows(run, opts: TraverseOptions, graph: LatentGraph | None = None) -> tuple[np.ndarray, str]:
    """Anchors as rows of the run's z, and how they were chosen (for traverse.json).

    k-means anchors for a graph path are the particles nearest each centre WITHIN the graph's largest
    connected component: the paper's threshold graph leaves sparse particles isolated, and an on-data
    centre that happened to be one of them would make an automatic path impossible. Anchors the user
    names are taken as given (and a disconnected pair is an error naming them).
    """
    from scipy.sparse.csgraph import connected_components

    from drgn_core import analysis

    if opts.anchors is not None and opts.kmeans is not None:
        raise InputError("give anchors either as table rows or by k-means, not both")
    if opts.anchors is not None:
        if len(opts.anchors) < 2:
            raise InputError(f"a path needs at least 2 anchors, got {len(opts.anchors)}")
        return map_rows(run.indices, opts.anchors, "anchor", run.run_dir), "given"
    if opts.kmeans is None:
        raise InputError(f"--method {opts.method} needs anchors: --anchors i,j,… (table rows) or --kmeans K")
    if opts.kmeans < 2:
        raise InputError(f"--kmeans needs K >= 2, got {opts.kmeans}")
    _, centres = analysis.kmeans(run.z, opts.kmeans, seed=opts.seed)
    how = f"kmeans{opts.kmeans} on-data centres"
    if graph is None:
        rows = analysis.nearest_rows(run.z, centres)
    else:
        _, comp = connected_components(graph.adjacency, directed=False)
        allowed = np.nonzero(comp == np.argmax(np.bincount(comp)))[0]
        rows = allowed[analysis.nearest_rows(run.z[allowed], centres)]
        rows = rows[np.sort(np.unique(rows, return_index=True)[1])]   # two centres may share a particle
        how += f" in the graph's largest connected component ({len(allowed)} particles)"
    pc1 = analysis.fit_pca(run.z).transform(run.z[rows])[:, 0]
    return rows[order_anchors(run.z[rows], pc1)], how + ", ordered from the lowest PC1 by nearest neighbour"


def traverse(run_dir: str | os.PathLike, outdir: str | os.PathLike, opts: TraverseOptions) -> dict:
    """Compute a trajectory and write it (and its volumes) into `outdir`, atomically → summary dict."""
    import json

    from drgn_core import analysis, plots
    from drgn_core.io.atomic import atomic_dir

    run = load_run(run_dir)
    outdir = Path(outdir)
    analysis.check_outdir(outdir, [run.run_dir])
    if opts.method not in ("graph", "pc", "linear"):
        raise InputError(f"unknown method {opts.method!r} (choose graph, pc or linear)")
    if opts.max_volumes is not None and opts.max_volumes < 1:
        raise InputError(f"--max-volumes must be >= 1, got {opts.max_volumes}")
    summary: dict = {"run": str(run.run_dir), "method": opts.method, "n_particles": run.n, "seed": opts.seed}
    path_rows = None
    if opts.method == "graph":
        if opts.anchors is not None or opts.kmeans is None:
            _anchor_rows(run, opts)  # check named (or missing) anchors before the long graph build
        graph = build_graph(run.z, opts.avg_neighbors, opts.max_neighbors, seed=opts.seed, device=opts.device,
                            sample=opts.sample, exact_max=opts.exact_max)
        rows, how = _anchor_rows(run, opts, graph)
        path_rows, cum = graph_path(graph, rows.tolist(), names=run.indices[rows].tolist())
        z_path = run.z[path_rows]
        summary.update(anchors=run.indices[rows].tolist(), anchors_from=how, graph=graph.info,
                       path_length=len(path_rows), path_distance=float(cum[-1]),
                       cumulative_distance=cum.tolist())
        anchor_z = run.z[rows]
    elif opts.method == "linear":
        rows, how = _anchor_rows(run, opts)
        z_path = linear_path(run.z[rows], opts.n_points)
        summary.update(anchors=run.indices[rows].tolist(), anchors_from=how, points_per_segment=opts.n_points)
        anchor_z = run.z[rows]
    else:
        if opts.anchors is not None or opts.kmeans is not None:
            summary["ignored"] = "anchors: --method pc follows a principal axis"
        if not 1 <= opts.pc <= run.zdim:
            raise InputError(f"--pc must be between 1 and zdim = {run.zdim}, got {opts.pc}")
        pca = analysis.fit_pca(run.z)
        z_path, t = analysis.pc_traversal(run.z, pca, opts.pc - 1, n=opts.n_points)
        summary.update(pc=opts.pc, t=t.tolist(), percentiles=list(analysis.PC_PERCENTILES))
        anchor_z = None
    pos = even_subsample(len(z_path), opts.max_volumes)
    summary.update(volume_positions=pos.tolist(), volumes=not opts.skip_volumes)
    with atomic_dir(outdir) as tmp:
        if path_rows is not None:
            write_index_files(run.indices[path_rows], tmp / "path_ind.npy")
        np.savetxt(tmp / "z_path.txt", z_path, fmt="%.8g")
        if run.zdim == 1:
            steps = np.arange(len(z_path), dtype=np.float64)
            plots.path_2d(np.zeros((0, 2)), np.stack([steps, z_path[:, 0]], 1), tmp / "path.png", "step", "z",
                          title=f"{opts.method} path")
        else:
            pca = analysis.fit_pca(run.z)
            xy = pca.transform(run.z)[:, :2]
            a_xy = pca.transform(anchor_z)[:, :2] if anchor_z is not None else None
            plots.path_2d(xy, pca.transform(z_path)[:, :2], tmp / "path.png", "PC1", "PC2", anchors_xy=a_xy,
                          title=f"{opts.method} path ({len(z_path)} points)")
        if opts.skip_volumes:
            (tmp / "volumes").mkdir()
            np.savetxt(tmp / "volumes" / "z_values.txt", z_path[pos], fmt="%.8g",
                       header="latent value of each volume (not generated: --skip-volumes)")
        else:
            write_volumes(run.run_dir, z_path[pos], tmp / "volumes", D=opts.D, device=opts.device)
        with open(tmp / "traverse.json", "w") as f:
            json.dump(summary, f, indent=1)
    return summary
