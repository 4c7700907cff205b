"""drgn analyze: PCA, UMAP (with the subsample + transform path), k-means on-data centres, PC traversals,
label means, volumes, and the command's outputs and errors, on synthetic latents with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest_latent import add_tiny_model, clusters, make_run

from drgn_core import analysis, rundir
from drgn_core.cli import main
from drgn_core.errors import InputError
from drgn_core.io.mrc import read_mrc


def test_pca_matches_sklearn_and_fixes_signs():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 5)) @ rng.normal(size=(5, 5)) + 3.0
    p = analysis.fit_pca(z)
    ref = PCA().fit(z)
    np.testing.assert_allclose(p.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-8)
    np.testing.assert_allclose(np.abs(p.components), np.abs(ref.components_), atol=1e-8)
    # sign rule: each PC's largest-magnitude loading is positive
    assert np.all(p.components[np.arange(5), np.argmax(np.abs(p.components), 1)] > 0)
    proj = p.transform(z)
    np.testing.assert_allclose(np.abs(proj), np.abs(ref.transform(z)), atol=1e-4)
    np.testing.assert_allclose(proj.var(0, ddof=1), p.explained_variance, rtol=1e-4)


def test_kmeans_centres_are_on_data_and_nearest():
    rng = np.random.default_rng(1)
    z, truth = clusters(rng, rng.normal(size=(4, 6)) * 5, [60, 50, 40, 30])
    labels, centres = analysis.kmeans(z, 4, seed=0)
    rows = analysis.nearest_rows(z, centres)
    # the on-data centre is a real particle, and no particle is closer to the centre
    d = np.linalg.norm(z[:, None, :] - centres[None], axis=-1)
    np.testing.assert_array_equal(rows, np.argmin(d, axis=0))
    assert all(any(np.array_equal(z[r], row) for row in z) for r in rows)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, labels) == 1.0
    again, _ = analysis.kmeans(z, 4, seed=0)
    np.testing.assert_array_equal(labels, again)


def test_nearest_rows_chunks_agree():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(1000, 3)).astype(np.float32)
    pts = rng.normal(size=(7, 3))
    np.testing.assert_array_equal(analysis.nearest_rows(z, pts, chunk=64), analysis.nearest_rows(z, pts))


def test_pc_traversal_spans_5th_to_95th_percentile():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2000, 4)) * [5, 2, 1, 0.5] + [1, 2, 3, 4]
    p = analysis.fit_pca(z)
    pts, t = analysis.pc_traversal(z, p, 0, n=10)
    coord = (z - p.mean) @ p.components[0]
    np.testing.assert_allclose(t[[0, -1]], np.percentile(coord, [5, 95]), rtol=1e-6)
    np.testing.assert_allclose(np.diff(t), np.diff(t)[0], rtol=1e-6)
    # every point is mean + t·PC1: no component along the other PCs
    off = (pts - p.mean) @ p.components[1:].T
    np.testing.assert_allclose(off, 0, atol=1e-5)
    np.testing.assert_allclose((pts - p.mean) @ p.components[0], t, rtol=1e-5)


def test_percentile_points_zdim1():
    z = np.arange(101, dtype=np.float32)[:, None]  # percentiles of 0..100 are the numbers themselves
    np.testing.assert_allclose(analysis.percentile_points(z)[:, 0], [5, 23, 41, 59, 77, 95])


def test_labels_follow_canonical_rows_and_means(tmp_path):
    indices = np.array([4, 1, 3])
    (tmp_path / "l.txt").write_text("a\nb\nc\nb\na\n")
    lab = analysis.load_labels(tmp_path / "l.txt", indices)
    assert lab.tolist() == ["a", "b", "b"]  # rows 4, 1, 3 of the table
    np.save(tmp_path / "l.npy", np.array([10, 11, 12, 13, 14]))
    assert analysis.load_labels(tmp_path / "l.npy", indices).tolist() == [14, 11, 13]
    z = np.array([[0.0, 1.0], [2.0, 2.0], [4.0, 0.0]])
    values, means, counts = analysis.label_means(z, lab)
    assert values.tolist() == ["a", "b"] and counts.tolist() == [1, 2]
    np.testing.assert_allclose(means, [[0, 1], [3, 1]])
    with pytest.raises(InputError, match="has 5 labels but the run uses table row 7"):
        analysis.load_labels(tmp_path / "l.npy", np.array([7]))


def test_load_run_errors(tmp_path):
    run = make_run(tmp_path / "r", np.zeros((5, 2)))
    np.save(run / "indices.npy", np.arange(4))
    with pytest.raises(InputError, match=r"has 4 rows but z\.npy has 5"):
        rundir.load_run(run)
    np.save(run / "indices.npy", np.array([0, 1, 1, 2, 3]))
    with pytest.raises(InputError, match="index 1 appears 2 times; each row may be selected once"):
        rundir.load_run(run)
    z = np.zeros((5, 2))
    z[2, 1] = np.nan
    make_run(run, z)
    with pytest.raises(InputError, match="1 latent rows are NaN or infinite"):
        rundir.load_run(run)


@pytest.mark.slow  # numba compiles UMAP on first use: ~25 s on two busy cores
def test_umap_subsample_and_transform_keep_clusters():
    """Above max_fit, UMAP is fitted on a seeded subsample and the other particles are transformed:
    transformed particles must land with their own cluster's fitted particles."""
    rng = np.random.default_rng(4)
    z, truth = clusters(rng, rng.normal(size=(3, 8)) * 6, [100, 100, 100], scale=0.5)
    res = analysis.run_umap(z, seed=0, max_fit=150, chunk=60)
    assert len(res.fit_rows) == 150 and res.info["transformed_rows"] == 150
    assert np.isfinite(res.embedding).all()
    rest = np.setdiff1d(np.arange(300), res.fit_rows)
    fe = res.embedding[res.fit_rows]
    d = np.linalg.norm(res.embedding[rest][:, None] - fe[None], axis=-1)
    nearest_truth = truth[res.fit_rows][np.argmin(d, axis=1)]
    assert np.mean(nearest_truth == truth[rest]) >= 0.98
    again = analysis.run_umap(z, seed=0, max_fit=150, chunk=60)
    np.testing.assert_array_equal(res.fit_rows, again.fit_rows)
    np.testing.assert_allclose(res.embedding, again.embedding)


def test_umap_kernels_are_cached_on_disk():
    """umap-learn compiles its graph kernels without numba's disk cache (11 s of CPU per fitting process
    at 3,000 points); run_umap gives them one, so the compiled kernel is on disk after a fit and the
    embedding is unchanged by it."""
    import os

    import umap.umap_

    z = np.random.default_rng(1).normal(size=(120, 4)).astype(np.float32)
    first = analysis.run_umap(z, seed=0).embedding
    kernel = umap.umap_.smooth_knn_dist
    assert type(kernel._cache).__name__ == "FunctionCache"
    assert os.path.exists(kernel._cache._cache_file._index_path)
    assert analysis.cache_umap_kernels() == 0          # every cacheable kernel has its cache already
    np.testing.assert_array_equal(first, analysis.run_umap(z, seed=0).embedding)


@pytest.mark.slow  # compiles UMAP when run alone
def test_analyze_writes_umap(tmp_path):
    rng = np.random.default_rng(7)
    z, _ = clusters(rng, rng.normal(size=(3, 4)) * 6, [40, 40, 40])
    run = make_run(tmp_path / "run", z)
    out = tmp_path / "an"
    assert main(["analyze", str(run), "-o", str(out), "--skip-volumes", "--ksample", "3",
                 "--umap-max-fit", "100"]) == 0
    emb = np.load(out / "umap.npy")
    assert emb.shape == (120, 2) and np.isfinite(emb).all()
    s = json.loads((out / "summary.json").read_text())
    assert s["umap"]["fit_rows"] == 100 and s["umap"]["transformed_rows"] == 20
    for f in ("umap_scatter.png", "umap_hexbin.png", "kmeans3/umap_centers.png", "kmeans3/umap_clusters.png"):
        assert (out / f).stat().st_size > 1000


def test_analyze_outputs_without_volumes(tmp_path):
    rng = np.random.default_rng(5)
    z, _ = clusters(rng, rng.normal(size=(5, 10)) * 4, [40] * 5)
    indices = 1000 + 3 * np.arange(len(z))  # a run trained on a subset: rows are canonical, not 0..N-1
    run = make_run(tmp_path / "run", z, indices)
    out = tmp_path / "an"
    assert main(["analyze", str(run), "-o", str(out), "--skip-volumes", "--skip-umap", "--ksample", "6"]) == 0
    pca = np.load(out / "pca.npy")
    assert pca.shape == (200, 10)
    labels = np.load(out / "kmeans6" / "labels.npy")
    assert labels.shape == (200,) and set(labels.tolist()) == set(range(6))
    cind = np.load(out / "kmeans6" / "centers_ind.npy")
    assert cind.dtype == np.int64 and set(cind.tolist()) <= set(indices.tolist())
    rows = np.searchsorted(indices, cind)
    np.testing.assert_allclose(np.loadtxt(out / "kmeans6" / "centers.txt"), z[rows], rtol=1e-5)
    np.testing.assert_array_equal(np.loadtxt(out / "kmeans6" / "centers_ind.txt", dtype=int), cind)
    s = json.loads((out / "summary.json").read_text())
    assert s["kmeans"]["centers_ind"] == cind.tolist() and s["umap"]["computed"] is False
    for f in ("pca_explained_variance.png", "pca_scatter.png", "pca_hexbin.png", "kmeans6/pca_centers.png"):
        assert (out / f).stat().st_size > 1000
    pc1 = np.loadtxt(out / "pc1" / "z_values.txt")
    assert pc1.shape == (10, 10)
    assert not (out / "umap.npy").exists()


def test_analyze_zdim1_percentiles(tmp_path):
    z = np.linspace(-2, 2, 401)
    run = make_run(tmp_path / "run", z)
    out = tmp_path / "an"
    assert main(["analyze", str(run), "-o", str(out), "--skip-volumes", "--ksample", "3"]) == 0
    pts = np.loadtxt(out / "percentiles" / "z_values.txt")
    np.testing.assert_allclose(pts, np.percentile(z, [5, 23, 41, 59, 77, 95]), atol=1e-5)
    assert (out / "z_hist.png").exists() and not (out / "umap.npy").exists()
    s = json.loads((out / "summary.json").read_text())
    assert s["umap"]["reason"] == "zdim = 1 <= 2"


def test_analyze_names_the_held_out_particles(tmp_path, capsys):
    """A run trained with --val-frac > 0 has latents from an encoder that never saw those particles: the
    analysis says how many, and records it; a run without held-out particles gets no note."""
    z = np.linspace(-2, 2, 200)
    run = make_run(tmp_path / "run", z, 10 + np.arange(200))
    np.save(run / "val_indices.npy", np.array([12, 50, 51, 199, 5000]))  # 5000: not a row of this run
    assert main(["analyze", str(run), "-o", str(tmp_path / "an"), "--skip-volumes", "--ksample", "2"]) == 0
    err = capsys.readouterr().err
    assert "note: 4 of 200 particles (2 %) were held out of training (val_indices.npy)" in err
    assert "--val-frac 0" in err
    assert json.loads((tmp_path / "an" / "summary.json").read_text())["n_held_out"] == 4
    np.save(run / "val_indices.npy", np.array([], dtype=np.int64))
    assert main(["analyze", str(run), "-o", str(tmp_path / "an2"), "--skip-volumes", "--ksample", "2"]) == 0
    assert "held out" not in capsys.readouterr().err
    assert json.loads((tmp_path / "an2" / "summary.json").read_text())["n_held_out"] == 0


def test_analyze_writes_volumes_and_label_means(tmp_path):
    rng = np.random.default_rng(6)
    z, truth = clusters(rng, rng.normal(size=(3, 3)) * 4, [30, 30, 30])
    run = make_run(tmp_path / "run", z)
    add_tiny_model(run, zdim=3, D=16, apix=2.5)
    np.savetxt(tmp_path / "classes.txt", truth, fmt="%d")
    out = tmp_path / "an"
    assert main(["analyze", str(run), "-o", str(out), "--ksample", "3", "--pc", "1", "--pc-points", "4",
                 "--labels", str(tmp_path / "classes.txt"), "--skip-umap"]) == 0
    km = sorted((out / "kmeans3").glob("vol_*.mrc"))
    assert len(km) == 3
    vol, apix = read_mrc(km[0], mmap=False)
    assert vol.shape == (16, 16, 16) and apix == pytest.approx(2.5)
    assert len(list((out / "pc1").glob("vol_*.mrc"))) == 4
    # label volumes sit at each class's mean latent, in sorted label order
    zl = np.loadtxt(out / "labels" / "z_values.txt")
    np.testing.assert_allclose(zl, [z[truth == c].mean(0) for c in range(3)], rtol=1e-5, atol=1e-6)
    assert len(list((out / "labels").glob("vol_*.mrc"))) == 3
    # a volume is the model's decoding at that z
    vols, _ = rundir.decode_volumes(run, zl[:1], device="cpu")
    got, _ = read_mrc(out / "labels" / "vol_000.mrc", mmap=False)
    np.testing.assert_allclose(got, vols[0], rtol=1e-5, atol=1e-6)


def test_analyze_cli_errors(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"drgn analyze: error: {tmp_path / 'missing'}: no such run directory"
    run = make_run(tmp_path / "run", np.zeros((10, 2)))
    assert main(["analyze", str(run), "-o", str(run)]) == 2
    assert "output folder would replace the input" in capsys.readouterr().err
    assert (run / "z.npy").exists()


def test_exact_knn_matches_brute_force_with_self_first():
    """exact_knn returns each row's k nearest by Euclidean distance, the row itself first at distance 0,
    even when a duplicate row ties with it."""
    rng = np.random.default_rng(7)
    z = rng.normal(size=(200, 6)).astype(np.float32)
    z[5] = z[9]  # a tie at distance 0
    idx, dist, none = analysis.exact_knn(z, 8)
    assert none is None and idx.shape == dist.shape == (200, 8)
    assert (idx[:, 0] == np.arange(200)).all() and (dist[:, 0] == 0).all()
    d = np.linalg.norm(z[:, None].astype(np.float64) - z[None].astype(np.float64), axis=-1)
    ref = np.sort(d, axis=1)[:, :8]
    np.testing.assert_allclose(dist, ref, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(d, idx.astype(np.int64), axis=1), ref, atol=1e-5)
    assert 9 in idx[5] and 5 in idx[9]


@pytest.mark.slow  # compiles umap-learn's own neighbour path: ~40 s on two busy cores
def test_run_umap_exact_neighbours_give_umaps_own_graph():
    """Below umap-learn's exact-distance threshold, handing it exact_knn builds the fuzzy graph of its own
    pairwise-distance path: the same edges but for near-ties, with weights within a few hundredths (its
    distances are float32 sums, ours float64), and run_umap says it used them."""
    import umap

    rng = np.random.default_rng(3)
    z, _ = clusters(rng, rng.normal(size=(3, 10)) * 4, [120, 120, 120], scale=0.7)
    kw = {"n_neighbors": analysis.UMAP_NEIGHBORS, "min_dist": 0.1, "random_state": 0}
    own = umap.UMAP(**kw).fit(z).graph_
    ours = umap.UMAP(**kw, precomputed_knn=analysis.exact_knn(z, analysis.UMAP_NEIGHBORS)).fit(z).graph_
    assert own.shape == ours.shape and own.nnz == ours.nnz
    # the same edges but for near-ties at the k-th neighbour, which float32 vs float64 distances may swap
    assert ((own != 0).astype(int) - (ours != 0).astype(int)).nnz <= 0.002 * own.nnz
    assert abs(own - ours).max() < 0.05 and abs(own - ours).sum() / abs(own).sum() < 0.01
    res = analysis.run_umap(z, seed=0)
    assert res.info["neighbours"] == "exact" and res.info["transformed_rows"] == 0
    assert np.isfinite(res.embedding).all()
