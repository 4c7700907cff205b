"""drgn traverse: the latent graph (threshold for average degree 5, ≤ 10 neighbours, exact torch search
equal to a k-d tree, NN-descent close to it), Dijkstra paths along a known 10-D curve, anchor handling,
disconnected anchors, and the PC / linear methods."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest_latent import add_tiny_model, make_run
from scipy.spatial import cKDTree
from scipy.stats import spearmanr

from drgn_core import plots, traversal
from drgn_core.cli import main
from drgn_core.errors import InputError


def helix(n: int = 1200, noise: float = 0.002, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points along a helix embedded in 10-D by a random rotation → (z, curve parameter t ∈ [0, 1]).

    t is evenly spaced with a little jitter: on a 1-D curve with uniformly RANDOM spacing, the paper's
    average-degree-5 threshold leaves gaps wider than itself (a spacing > 2.5× the mean has probability
    e^-2.5 ≈ 8 %), so such a graph falls apart into pieces by construction.
    """
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, n) + rng.uniform(-0.25, 0.25, n) / n
    curve = np.stack([np.cos(4 * np.pi * t), np.sin(4 * np.pi * t), 3 * t], 1)
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    z = np.concatenate([curve, np.zeros((n, 7))], 1) @ q.T + noise * rng.normal(size=(n, 10))
    perm = rng.permutation(n)  # rows not in curve order, so order must come from the graph
    return z[perm].astype(np.float32), t[perm]


def test_threshold_gives_average_degree_exactly_when_unsampled():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(300, 4)).astype(np.float32)
    t, info = traversal.distance_threshold(z, avg_degree=5, sample=1000)
    assert info["exact"]
    d = np.linalg.norm(z[:, None] - z[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (d < t).sum(1).mean() == pytest.approx(5.0)


def test_sampled_threshold_is_close():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(4000, 3)).astype(np.float32)
    t_exact, _ = traversal.distance_threshold(z, 5, sample=4000)
    t_est, info = traversal.distance_threshold(z, 5, sample=500, seed=0)
    assert info["sample_rows"] == 500 and not info["exact"]
    assert t_est == pytest.approx(t_exact, rel=0.1)
    # a sample of columns as well (rows × columns pairs only)
    t_est, info = traversal.distance_threshold(z, 5, sample=1000, col_sample=2000, seed=0)
    assert info["sample_columns"] == 2000 and info["pairs_below"] == pytest.approx(2500, abs=2)
    assert t_est == pytest.approx(t_exact, rel=0.1)


def test_exact_knn_matches_kdtree():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(700, 5)).astype(np.float32)
    idx, dist = traversal.knn_exact(z, 10, device="cpu", query_block=128)
    d_ref, i_ref = cKDTree(z.astype(np.float64)).query(z, k=11)
    np.testing.assert_array_equal(idx, i_ref[:, 1:])
    np.testing.assert_allclose(dist, d_ref[:, 1:], rtol=1e-5)


@pytest.mark.slow  # numba compiles pynndescent on first use: ~60 s on two busy cores
def test_nndescent_recall_and_graph():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(3000, 10)).astype(np.float32)
    idx, dist = traversal.knn_nndescent(z, 10, seed=0)
    _, i_ref = cKDTree(z).query(z, k=11)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, i_ref[:, 1:])])
    assert recall > 0.9
    assert not np.any(idx == np.arange(3000)[:, None])
    assert np.all(np.diff(dist, axis=1) >= 0)
    # the graph built through NN-descent (forced by a low exact_max) matches the exact one closely
    zh, _ = helix(600)
    g = traversal.build_graph(zh, device="cpu")
    g2 = traversal.build_graph(zh, device="cpu", exact_max=100)
    assert g2.info["search"] == "nndescent" and g2.threshold == g.threshold
    a, b = g.adjacency.tocsr(), g2.adjacency.tocsr()
    assert abs(a - b).sum() / a.sum() < 0.05


def test_graph_edges_respect_threshold_and_pruning():
    z, _ = helix(600)
    g = traversal.build_graph(z, avg_degree=5, max_neighbors=10, device="cpu")
    adj = g.adjacency.tocsr()
    out_deg = np.diff(adj.indptr)
    assert out_deg.max() <= 10
    assert adj.data.max() < g.threshold
    # edge weights are the true distances
    r, c = adj.nonzero()
    np.testing.assert_allclose(adj.data, np.linalg.norm(z[r] - z[c], axis=1), rtol=1e-4)
    assert g.info["connected_components"] == 1 and g.info["mean_degree"] == pytest.approx(5, abs=0.3)


def test_path_follows_the_curve_through_anchors_in_order(tmp_path):
    z, t = helix()
    g = traversal.build_graph(z, device="cpu")
    anchors = [int(np.argmin(np.abs(t - v))) for v in (0.05, 0.6, 0.3, 0.95)]
    path, cum = traversal.graph_path(g, anchors)
    pos = [int(np.nonzero(path == a)[0][0]) for a in anchors]
    assert pos == sorted(pos) and pos[0] == 0 and pos[-1] == len(path) - 1
    assert np.all(np.diff(cum) >= 0)
    # between consecutive anchors the path moves monotonically along the curve
    for s, (a, b) in enumerate(itertools.pairwise(pos)):
        seg = t[path[a:b + 1]]
        assert spearmanr(np.arange(len(seg)), seg).statistic * np.sign(seg[-1] - seg[0]) > 0.99, s
        lo, hi = sorted((t[anchors[s]], t[anchors[s + 1]]))
        assert seg.min() > lo - 0.01 and seg.max() < hi + 0.01


def test_disconnected_anchors_error_names_them(tmp_path, capsys):
    rng = np.random.default_rng(5)
    z = np.concatenate([rng.normal(size=(100, 3)), rng.normal(size=(100, 3)) + 100]).astype(np.float32)
    run = make_run(tmp_path / "run", z, 7000 + np.arange(200))
    g = traversal.build_graph(z, device="cpu")
    with pytest.raises(traversal.DisconnectedAnchors, match="anchors 3 and 150"):
        traversal.graph_path(g, [3, 150], names=[3, 150])
    assert main(["traverse", str(run), "-o", str(tmp_path / "o"), "--anchors", "7003,7010,7150",
                 "--skip-volumes"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("drgn traverse: error: anchors 7010 and 7150 (table rows) are not connected")
    assert "their components hold" in err and "\n" not in err and not (tmp_path / "o").exists()


def test_traverse_cli_graph_outputs_canonical_rows(tmp_path):
    z, t = helix(800)
    idx = 50_000 + 2 * np.arange(800)
    run = make_run(tmp_path / "run", z, idx)
    a, b = int(np.argmin(t)), int(np.argmax(t))
    out = tmp_path / "tr"
    assert main(["traverse", str(run), "-o", str(out), "--anchors", f"{idx[a]},{idx[b]}", "--skip-volumes",
                 "--max-volumes", "7"]) == 0
    path_ind = np.load(out / "path_ind.npy")
    assert path_ind.dtype == np.int64 and path_ind[0] == idx[a] and path_ind[-1] == idx[b]
    rows = (path_ind - 50_000) // 2
    np.testing.assert_allclose(np.loadtxt(out / "z_path.txt"), z[rows], rtol=1e-5, atol=1e-6)
    assert spearmanr(np.arange(len(rows)), t[rows]).statistic > 0.99
    s = json.loads((out / "traverse.json").read_text())
    assert s["path_length"] == len(path_ind) and s["graph"]["search"] == "exact"
    vz = np.loadtxt(out / "volumes" / "z_values.txt")
    assert len(vz) == 7
    np.testing.assert_allclose(vz[[0, -1]], z[rows[[0, -1]]], rtol=1e-5, atol=1e-6)
    assert (out / "path.png").stat().st_size > 1000


def test_anchor_rows_not_in_run(tmp_path, capsys):
    run = make_run(tmp_path / "run", np.random.default_rng(0).normal(size=(50, 2)), np.arange(100, 150))
    assert main(["traverse", str(run), "-o", str(tmp_path / "o"), "--anchors", "100,7"]) == 2
    assert "anchor table row(s) 7 are not among the run's 50 particles" in capsys.readouterr().err


def test_kmeans_anchor_order_and_helpers():
    z = np.array([[3.0], [0.0], [1.0], [2.0]])
    np.testing.assert_array_equal(traversal.order_anchors(z, z[:, 0]), [1, 2, 3, 0])
    line = traversal.linear_path(np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]]), 3)
    np.testing.assert_allclose(line, [[0, 0], [0.5, 0], [1, 0], [1, 1], [1, 2]])
    assert plots.even_subsample(10, 4).tolist() == [0, 3, 6, 9]
    assert plots.even_subsample(3, 50).tolist() == [0, 1, 2]
    with pytest.raises(InputError, match="at least 2 points per segment"):
        traversal.linear_path(line, 1)


def test_pc_and_linear_methods_with_volumes(tmp_path):
    rng = np.random.default_rng(6)
    z = rng.normal(size=(300, 2)) * [3.0, 0.5]
    run = make_run(tmp_path / "run", z)
    add_tiny_model(run, zdim=2, D=16)
    out = tmp_path / "pc"
    assert main(["traverse", str(run), "-o", str(out), "--method", "pc", "--pc", "1", "--n", "5"]) == 0
    zp = np.loadtxt(out / "z_path.txt")
    s = json.loads((out / "traverse.json").read_text())
    assert zp.shape == (5, 2) and len(s["t"]) == 5
    assert len(list((out / "volumes").glob("vol_*.mrc"))) == 5
    assert not (out / "path_ind.npy").exists()
    out = tmp_path / "lin"
    assert main(["traverse", str(run), "-o", str(out), "--method", "linear", "--anchors", "0,1,2", "--n", "4",
                 "--max-volumes", "3"]) == 0
    zl = np.loadtxt(out / "z_path.txt")
    assert zl.shape == (7, 2)
    np.testing.assert_allclose(zl[[0, 3, 6]], z[[0, 1, 2]], rtol=1e-5, atol=1e-6)
    assert len(list((out / "volumes").glob("vol_*.mrc"))) == 3


def test_kmeans_anchors_are_on_data_centres_visited_in_order(tmp_path):
    z, _ = helix(600)
    run = make_run(tmp_path / "run", z, 10 + np.arange(600))
    out = tmp_path / "km"
    assert main(["traverse", str(run), "-o", str(out), "--kmeans", "4", "--skip-volumes"]) == 0
    s = json.loads((out / "traverse.json").read_text())
    assert len(s["anchors"]) == 4 and s["anchors_from"].startswith("kmeans4")
    from drgn_core import analysis

    _, centres = analysis.kmeans(z, 4, seed=0)
    assert sorted(s["anchors"]) == sorted((10 + analysis.nearest_rows(z, centres)).tolist())
    path = np.load(out / "path_ind.npy").tolist()
    pos = [path.index(a) for a in s["anchors"]]
    assert pos == sorted(pos) and pos[0] == 0 and pos[-1] == len(path) - 1


def test_kmeans_anchors_stay_in_the_largest_component(tmp_path):
    """A far-away clump gets its own k-means centre; its anchor is snapped into the main component so
    the automatic path exists, while the same rows given explicitly are an error."""
    z, _ = helix(600)
    clump = 40.0 + 0.01 * np.random.default_rng(7).normal(size=(20, 10))
    zz = np.concatenate([z, clump]).astype(np.float32)
    run = make_run(tmp_path / "run", zz)
    out = tmp_path / "km"
    assert main(["traverse", str(run), "-o", str(out), "--kmeans", "3", "--skip-volumes"]) == 0
    s = json.loads((out / "traverse.json").read_text())
    assert all(a < 600 for a in s["anchors"]) and "largest connected component (600" in s["anchors_from"]
    assert np.all(np.load(out / "path_ind.npy") < 600)
    named = ["--anchors", "0,610", "--skip-volumes"]
    assert main(["traverse", str(run), "-o", str(tmp_path / "x"), *named]) == 2
