"""drgn filter: each rule removes exactly the particles it should on synthetic latents with known outliers,
runs with different index subsets combine as sets of canonical rows, outputs are reproducible, and spec
mistakes give one-line errors naming the key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest_latent import clusters, make_run, write_gt_table

from drgn_core import analysis, filtering
from drgn_core.cli import main
from drgn_core.errors import InputError


def _spec(tmp_path, data) -> str:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def _rows(out, name):
    a = np.load(out / f"{name}.npy")
    assert a.dtype == np.int64 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(np.loadtxt(out / f"{name}.txt", dtype=np.int64, ndmin=1), a)
    return a


def test_threshold_zdim1_removes_exactly_z_le_minus1(tmp_path):
    z = np.array([-3.0, -1.0, -0.999, 0.0, 2.0, -1.5, 0.5])
    idx = np.array([10, 11, 12, 13, 14, 15, 16])
    run = make_run(tmp_path / "z1", z, idx)
    out = tmp_path / "f"
    rule = {"threshold": {"dim": 0, "op": "<=", "value": -1}}
    spec = _spec(tmp_path, [{"run": str(run), "filters": [rule]}])
    assert main(["filter", "--spec", spec, "-o", str(out)]) == 0
    assert _rows(out, "removed").tolist() == [10, 11, 15]
    assert _rows(out, "kept").tolist() == [12, 13, 14, 16]
    rep = json.loads((out / "filter.json").read_text())
    assert rep["combined"] == {"how": "intersection", "particles": 7, "kept": 4, "removed": 3}
    assert rep["runs"][0]["filters"][0]["removed"] == 3
    assert (out / "filter.png").stat().st_size > 1000
    # the same rule from flags gives the same sets
    out2 = tmp_path / "f2"
    assert main(["filter", "--run", str(run), "--threshold", "0", "<=", "-1", "-o", str(out2)]) == 0
    np.testing.assert_array_equal(np.load(out2 / "kept.npy"), np.load(out / "kept.npy"))
    # strict '<' keeps the particle sitting exactly on the threshold
    strict = filtering.FilterSpec("threshold", {"dim": 0, "op": "<", "value": -1})
    r = filtering.apply_filter(z[:, None], strict, run)
    assert r.removed.tolist() == [True, False, False, False, False, True, False]


def test_gmm_largest_mean_norm_finds_the_outlier_cluster(tmp_path):
    rng = np.random.default_rng(0)
    centres = np.zeros((5, 10))
    centres[:4, :4] = 2.0 * np.eye(4)       # four ordinary states near the origin
    centres[4] = 12.0                       # impurities: far out, largest ‖z‖
    z, lab = clusters(rng, centres, [150, 120, 100, 90, 60], scale=0.3)
    run = make_run(tmp_path / "z10", z)
    spec = filtering.parse_spec([{"run": str(run), "filters": [
        {"gmm": {"components": 5, "covariance": "full", "seed": 0,
                 "remove": {"rule": "largest_mean_norm", "n": 1}}}]}])
    outcome = filtering.run_filters(spec.runs[0])
    np.testing.assert_array_equal(outcome.removed, lab == 4)
    info = outcome.results[0].info
    assert info["removed_components"] == [int(np.argmax(info["component_mean_norm"]))]
    assert sorted(info["component_counts"]) == [60, 90, 100, 120, 150]
    # removing by id gives the same set when the id is that component's
    spec_ids = filtering.parse_spec([{"run": str(run), "filters": [
        {"gmm": {"components": 5, "seed": 0, "remove": {"ids": info["removed_components"]}}}]}])
    np.testing.assert_array_equal(filtering.run_filters(spec_ids.runs[0]).removed, lab == 4)


def test_gmm_outlying_mean_norm_removes_every_far_component_and_only_those(tmp_path):
    """Two kinds of junk far from a bulk of three states: the rule removes both far components, whatever
    their number, and keeps the states (a fixed largest_mean_norm n: 3 would take a state out)."""
    rng = np.random.default_rng(1)
    centres = np.zeros((5, 10))
    centres[:3, :3] = 0.8 * np.eye(3)       # three ordinary states near the origin
    centres[3, 5], centres[4, 7] = 9.0, -7.0  # two kinds of junk
    z, lab = clusters(rng, centres, [400, 300, 200, 50, 40], scale=0.25)
    run = make_run(tmp_path / "z10", z)

    def removed(remove: dict) -> filtering.RunOutcome:
        spec = filtering.parse_spec([{"run": str(run), "filters": [
            {"gmm": {"components": 5, "covariance": "full", "seed": 0, "remove": remove}}]}])
        return filtering.run_filters(spec.runs[0])

    out = removed({"rule": "outlying_mean_norm"})
    np.testing.assert_array_equal(out.removed, lab >= 3)
    info = out.results[0].info
    median = float(np.median(np.linalg.norm(z.astype(np.float64), axis=1)))
    assert info["mean_norm_limit"] == pytest.approx(2 * median)
    assert out.results[0].params["remove"] == {"rule": "outlying_mean_norm", "factor": 2.0, "separation": 2.0}
    assert info["best_shell"] == out.results[0].info["removed_components"] and info["best_separation"] > 5
    # The paper's literal rule with n: 3 takes a state out; with the separation test (the default) only
    # the separated shell of the three candidates goes: the two junk components.
    assert removed({"rule": "largest_mean_norm", "n": 3, "separation": 0}).removed.sum() > (lab >= 3).sum()
    np.testing.assert_array_equal(removed({"rule": "largest_mean_norm", "n": 3}).removed, lab >= 3)
    # a factor so large that nothing is far enough: nothing is removed
    assert removed({"rule": "outlying_mean_norm", "factor": 100}).removed.sum() == 0
    for bad, msg in (({"rule": "outlying_mean_norm", "factor": 1}, "'remove.factor' must be a number > 1"),
                     ({"rule": "outlying_mean_norm", "n": 2}, "'remove.n' belongs to rule largest_mean_norm"),
                     ({"rule": "biggest"}, "unknown rule 'biggest'")):
        with pytest.raises(InputError, match=msg):
            filtering.parse_spec([{"run": str(run), "filters": [{"gmm": {"remove": bad}}]}])


def test_norm_rule_removes_beyond_mean_plus_k_std(tmp_path):
    rng = np.random.default_rng(1)
    z = rng.normal(size=(400, 3)) * 0.2
    z[:5] *= 60.0                          # five huge latents
    run = make_run(tmp_path / "r", z)
    out = tmp_path / "f"
    assert main(["filter", "--run", str(run), "--norm", "2", "-o", str(out)]) == 0
    norms = np.linalg.norm(z.astype(np.float32).astype(np.float64), axis=1)
    expect = np.nonzero(norms > norms.mean() + 2 * norms.std())[0]
    np.testing.assert_array_equal(_rows(out, "removed"), expect)
    assert set(range(5)) <= set(expect.tolist())


def test_box_in_pca_and_given_umap(tmp_path):
    # a symmetric grid: mean 0, diagonal covariance, x varies most → PC1 = +x, PC2 = +y exactly
    x, y = np.meshgrid(np.linspace(-10, 10, 21), np.linspace(-1, 1, 5), indexing="ij")
    z = np.stack([x.ravel(), y.ravel()], 1)
    run = make_run(tmp_path / "r", z)
    box = {"space": "pca", "xmin": -4.5, "xmax": 4.5}
    spec = filtering.parse_spec([{"run": str(run), "filters": [{"box": box}]}])
    kept = ~filtering.run_filters(spec.runs[0]).removed
    np.testing.assert_array_equal(kept, np.abs(z[:, 0]) < 4.5)
    spec = filtering.parse_spec([{"run": str(run), "filters": [{"box": {**box, "keep": "outside"}}]}])
    np.testing.assert_array_equal(filtering.run_filters(spec.runs[0]).removed, np.abs(z[:, 0]) < 4.5)
    # umap space from an analysis folder's umap.npy (rows aligned with z)
    emb = np.stack([np.arange(len(z)), np.zeros(len(z))], 1).astype(np.float32)
    np.save(tmp_path / "umap.npy", emb)
    spec = filtering.parse_spec([{"run": str(run), "filters": [
        {"box": {"space": "umap", "umap": str(tmp_path / "umap.npy"), "xmin": 10, "xmax": 19.5}}]}])
    assert np.nonzero(~filtering.run_filters(spec.runs[0]).removed)[0].tolist() == list(range(10, 20))
    np.save(tmp_path / "bad.npy", emb[:-1])
    spec = filtering.parse_spec([{"run": str(run), "filters": [
        {"box": {"space": "umap", "umap": str(tmp_path / "bad.npy"), "xmin": 0}}]}])
    with pytest.raises(InputError, match=r"has shape \(104, 2\), but run .* has 105 particles"):
        filtering.run_filters(spec.runs[0])


def test_kmeans_filter_uses_analyze_cluster_ids(tmp_path):
    rng = np.random.default_rng(2)
    z, _ = clusters(rng, rng.normal(size=(6, 4)) * 5, [30] * 6)
    run = make_run(tmp_path / "r", z, 500 + np.arange(180))
    labels, _ = analysis.kmeans(z, 6, seed=3)
    out = tmp_path / "f"
    assert main(["filter", "--run", str(run), "--kmeans", "6", "--kmeans-remove", "1,4", "--seed", "3",
                 "-o", str(out)]) == 0
    np.testing.assert_array_equal(_rows(out, "removed"), 500 + np.nonzero(np.isin(labels, [1, 4]))[0])


def test_two_runs_with_different_subsets_combine_as_sets(tmp_path):
    # run A saw rows 0..9 and removes 2, 3; run B saw rows 5..14 and removes 7, 12
    za = np.zeros(10)
    za[[2, 3]] = -5
    zb = np.zeros(10)
    zb[[2, 7]] = -5                        # B's rows 2 and 7 are table rows 7 and 12
    a = make_run(tmp_path / "a", za, np.arange(10))
    b = make_run(tmp_path / "b", zb, np.arange(5, 15))
    rule = [{"threshold": {"dim": 0, "op": "<", "value": -1}}]
    runs = [{"run": str(a), "filters": rule}, {"run": str(b), "filters": rule}]
    out = tmp_path / "i"
    assert main(["filter", "--spec", _spec(tmp_path, {"runs": runs}), "-o", str(out)]) == 0
    kept_a = set(range(10)) - {2, 3}
    kept_b = set(range(5, 15)) - {7, 12}
    assert _rows(out, "kept").tolist() == sorted(kept_a & kept_b)
    assert _rows(out, "removed").tolist() == sorted(set(range(15)) - (kept_a & kept_b))
    out = tmp_path / "u"
    spec = _spec(tmp_path, {"runs": runs, "combine": "union"})
    assert main(["filter", "--spec", spec, "-o", str(out)]) == 0
    assert _rows(out, "kept").tolist() == sorted(kept_a | kept_b)
    assert _rows(out, "removed").tolist() == [2, 3, 12]   # 7 is kept by A


def test_filters_within_a_run_intersection_and_union(tmp_path):
    z = np.array([[-2.0, 0.0], [0.0, 5.0], [-2.0, 5.0], [0.0, 0.0]])
    run = make_run(tmp_path / "r", z)
    rules = [{"threshold": {"dim": 0, "op": "<", "value": -1}},
             {"threshold": {"dim": 1, "op": ">", "value": 1}}]
    inter = filtering.run_filters(filtering.parse_spec([{"run": str(run), "filters": rules}]).runs[0])
    assert inter.removed.tolist() == [True, True, True, False]
    union = filtering.run_filters(
        filtering.parse_spec([{"run": str(run), "filters": rules, "combine": "union"}]).runs[0])
    assert union.removed.tolist() == [False, False, True, False]


def test_same_spec_same_outputs(tmp_path):
    rng = np.random.default_rng(3)
    z, _ = clusters(rng, rng.normal(size=(4, 5)) * 4, [50, 50, 50, 20])
    run = make_run(tmp_path / "r", z)
    spec = _spec(tmp_path, {"runs": [{"run": str(run), "filters": [
        {"gmm": {"components": 4, "seed": 7, "remove": {"rule": "largest_mean_norm"}}},
        {"kmeans": {"k": 5, "seed": 1, "remove_ids": [0]}},
        {"norm": {"k_std": 2.5}}]}]})
    outs = [tmp_path / "o1", tmp_path / "o2"]
    for o in outs:
        assert main(["filter", "--spec", spec, "-o", str(o)]) == 0
    for f in ("kept.npy", "kept.txt", "removed.npy", "removed.txt", "filter.json"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    rep = json.loads((outs[0] / "filter.json").read_text())
    assert rep["spec"]["runs"][0]["filters"][0]["gmm"]["seed"] == 7
    assert rep["spec"]["runs"][0]["filters"][0]["gmm"]["covariance"] == "full"  # defaults resolved


def test_ground_truth_precision_recall(tmp_path):
    z = np.array([-3.0, -2.0, -2.0, 0.0, 0.0, 1.0])   # removes rows 0, 1, 2
    junk = np.array([0, 1, 1, 1, 0, 0, 1])              # row 6 is junk but not in the run
    run = make_run(tmp_path / "r", z)
    table = write_gt_table(tmp_path / "table.star", 7, junk=junk)
    out = tmp_path / "f"
    assert main(["filter", "--run", str(run), "--threshold", "0", "<", "-1", "--table", str(table),
                 "-o", str(out)]) == 0
    gt = json.loads((out / "filter.json").read_text())["ground_truth"]
    # over the run's rows: removed {0,1,2}, junk {1,2,3} → precision = recall = F1 = 2/3
    assert gt["precision"] == pytest.approx(2 / 3) and gt["recall"] == pytest.approx(2 / 3)
    assert gt["f1"] == pytest.approx(2 / 3) and gt["true_positives"] == 2


def test_spec_errors_name_the_key(tmp_path, capsys):
    run = make_run(tmp_path / "r", np.zeros((5, 2)))
    spec = _spec(tmp_path, [{"run": str(run), "filters": [{"trheshold": {"dim": 0}}]}])
    assert main(["filter", "--spec", spec, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"drgn filter: error: {spec}: run 1, filter 1: unknown filter 'trheshold' "
                   "(known: threshold, gmm, kmeans, norm, box, selection, abinit_confidence)")
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match=r"run 1, filter 1 \(gmm\): unknown parameter 'n_components'"):
        filtering.parse_spec([{"run": str(run), "filters": [{"gmm": {"n_components": 5}}]}])
    with pytest.raises(InputError, match=r"\(threshold\): 'op' must be one of <=, >=, <, >, got '=='"):
        filtering.parse_spec([{"run": str(run), "filters": [
            {"threshold": {"dim": 0, "op": "==", "value": 1}}]}])
    with pytest.raises(InputError, match=r"\(kmeans\): cluster id 20 is out of range 0..19"):
        filtering.parse_spec([{"run": str(run), "filters": [{"kmeans": {"remove_ids": [20]}}]}])
    with pytest.raises(InputError, match="unknown key 'filter' \\(known: run, filters, combine\\)"):
        filtering.parse_spec([{"run": str(run), "filter": []}])
    with pytest.raises(InputError, match=r"dim 3 is out of range for run .* with zdim 2"):
        filtering.run_filters(filtering.parse_spec(
            [{"run": str(run), "filters": [{"threshold": {"dim": 3, "op": "<", "value": 0}}]}]).runs[0])
    assert main(["filter", "--spec", spec, "--norm", "3", "-o", str(tmp_path / "o")]) == 2
    assert "either --spec or --run" in capsys.readouterr().err
