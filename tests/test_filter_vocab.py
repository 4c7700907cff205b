"""One filter vocabulary (drgn_core.filter_vocab) behind the workflow schema, `drgn check-config` and
`drgn filter`; and the `selection` filter, which keeps or removes a saved index file's particles."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import yaml
from conftest_latent import make_run
from conftest_workflow import TINY_CONFIG, dry_run, write_config

from drgn_core import filtering
from drgn_core.cli import main
from drgn_core.config_check import load_schema, validate_config
from drgn_core.errors import InputError
from drgn_core.filter_vocab import FILTERS, VocabError, check_filter, filter_item_schema


def test_schema_filter_section_is_the_table():
    """config.schema.yaml's $defs.filter_item is exactly what the table generates: kinds, parameters,
    types, ranges, defaults, required keys and descriptions cannot drift apart."""
    assert load_schema()["$defs"]["filter_item"] == filter_item_schema()
    assert set(filtering.OPS) == set(FILTERS["threshold"].params["op"].choices)


@pytest.mark.parametrize("entry", [
    {"threshold": {"value": -1}}, {"gmm": {}}, {"kmeans": {"remove_ids": [3]}}, {"norm": {}},
    {"box": {"xmin": 0}}, {"selection": {"path": "picked.npy"}}])
def test_schema_defaults_equal_the_table_defaults(entry):
    """The config (defaults filled by the schema) and drgn filter (defaults filled by the table) resolve
    a filter to the same parameters."""
    kind = next(iter(entry))
    cfg = validate_config({"pilot": {"zdims": [2]}, "filter": {"pilots": [{"zdim": 2, "filters": [entry]}]}},
                          check_files=False)
    filled = cfg["filter"]["pilots"][0]["filters"][0]
    assert check_filter(filled) == check_filter(entry)
    assert check_filter(entry)[1] == {
        "threshold": {"dim": 0, "op": "<=", "value": -1.0},
        "gmm": {"components": 5, "covariance": "full", "seed": 0,
                "remove": {"rule": "largest_mean_norm", "n": 1, "separation": 2.0}},
        "kmeans": {"k": 20, "seed": 0, "remove_ids": [3]},
        "norm": {"k_std": 3.0},
        "box": {"space": "pca", "xmin": 0.0, "keep": "inside", "seed": 0},
        "selection": {"path": "picked.npy", "keep": "inside"}}[kind]


# entries the schema accepts but the table's rules refuse: drgn filter and check-config say the same thing
@pytest.mark.parametrize("entry, param, message", [
    ({"kmeans": {"k": 4, "remove_ids": [4]}}, "remove_ids", "cluster id 4 is out of range 0..3"),
    ({"gmm": {"components": 3, "remove": {"ids": [0, 3]}}}, "remove.ids",
     "component id 3 is out of range 0..2"),
    ({"gmm": {"components": 3, "remove": {"rule": "largest_mean_norm", "n": 3}}}, "remove.n",
     "'remove.n' must be between 1 and components - 1, got 3"),
    ({"gmm": {"remove": {"rule": "outlying_mean_norm", "n": 2}}}, "remove.n",
     "'remove.n' belongs to rule largest_mean_norm"),
    ({"box": {"keep": "outside"}}, None, "give at least one of xmin, xmax, ymin, ymax"),
    ({"box": {"xmin": 2, "xmax": 1}}, "xmin", "needs xmin < xmax, got 2 and 1"),
])
def test_vocabulary_errors_are_shared(tmp_path, entry, param, message):
    kind = next(iter(entry))
    with pytest.raises(VocabError) as e:
        check_filter(entry)
    assert str(e.value) == message and e.value.param == param
    run = make_run(tmp_path / "r", np.zeros((5, 2)))
    with pytest.raises(InputError) as e:
        filtering.parse_spec([{"run": str(run), "filters": [entry]}], source="spec.yaml")
    assert str(e.value) == f"spec.yaml: run 1, filter 1 ({kind}): {message}"
    with pytest.raises(InputError) as e:
        validate_config({"pilot": {"zdims": [2]}, "filter": {"pilots": [{"zdim": 2, "filters": [entry]}]}},
                        source="my.yaml", check_files=False)
    key = f"filter.pilots[0].filters[0].{kind}" + (f".{param}" if param else "")
    assert str(e.value) == f"my.yaml: 1 problem in the workflow config: key '{key}': {message}"


@pytest.mark.parametrize("entry, message", [
    ({"threshold": {"dim": 0, "op": "==", "value": 1}},
     "(threshold): 'op' must be one of <=, >=, <, >, got '=='"),
    ({"threshold": {"dim": 0}}, "(threshold): missing required parameter 'value'"),
    ({"threshold": {"dim": 1.5, "value": 0}}, "(threshold): 'dim' must be an integer, got 1.5"),
    ({"gmm": {"n_components": 5}}, "(gmm): unknown parameter 'n_components' (known: components, covariance, "
                                   "seed, remove)"),
    ({"gmm": {"components": 1}}, "(gmm): 'components' must be >= 2, got 1"),
    ({"norm": {"k_std": 0}}, "(norm): 'k_std' must be > 0, got 0"),
    ({"box": {"space": "tsne", "xmin": 0}}, "(box): 'space' must be pca or umap, got 'tsne'"),
    ({"selection": {"keep": "inside"}}, "(selection): missing required parameter 'path'"),
    ({"selection": {"path": "a.npy", "keep": "all"}},
     "(selection): 'keep' must be inside or outside, got 'all'"),
    ({"median": {}},
     ": unknown filter 'median' (known: threshold, gmm, kmeans, norm, box, selection, abinit_confidence)"),
])
def test_spec_vocabulary_messages(tmp_path, entry, message):
    with pytest.raises(InputError) as e:
        filtering.parse_spec([{"run": "r", "filters": [entry]}], source="spec.yaml")
    assert str(e.value) == f"spec.yaml: run 1, filter 1 {message}".replace("1 :", "1:")


# ---- the selection filter --------------------------------------------------------------------------------
def _rows(out, name):
    return np.load(out / f"{name}.npy").tolist()


def test_selection_keeps_or_removes_exactly_the_saved_rows(tmp_path, capsys):
    """A run over canonical rows 10..59; a saved selection of rows 12, 15, 30 plus two rows the run never
    saw (70, 999): inside keeps exactly 12, 15, 30; outside keeps the other 47."""
    z = np.linspace(-2, 2, 50)[:, None]
    run = make_run(tmp_path / "run", z, 10 + np.arange(50))
    (tmp_path / "picked.txt").write_text("30\n12\n999\n15\n70\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"runs": [{"run": str(run), "filters": [
        {"selection": {"path": str(tmp_path / "picked.txt")}}]}]}))
    assert main(["filter", "--spec", str(spec), "-o", str(tmp_path / "in")]) == 0
    assert _rows(tmp_path / "in", "kept") == [12, 15, 30]
    assert _rows(tmp_path / "in", "removed") == sorted(set(range(10, 60)) - {12, 15, 30})
    info = json.loads((tmp_path / "in" / "filter.json").read_text())["runs"][0]["filters"][0]
    assert info == {"filter": "selection", "params": {"path": str(tmp_path / "picked.txt"), "keep": "inside"},
                    "removed": 47, "selection_rows": 5, "selected_in_run": 3}
    np.save(tmp_path / "picked.npy", np.array([12, 15, 30]))
    assert main(["filter", "--run", str(run), "--selection", str(tmp_path / "picked.npy"),
                 "--selection-keep", "outside", "-o", str(tmp_path / "out")]) == 0
    assert _rows(tmp_path / "out", "kept") == sorted(set(range(10, 60)) - {12, 15, 30})
    assert _rows(tmp_path / "out", "removed") == [12, 15, 30]
    # with another filter (intersection of kept sets): inside the selection AND not z < -1 (z of row r is
    # -2 + 4 (r - 10) / 49, below -1 for rows 10..22)
    both = filtering.run_filter_spec(filtering.parse_spec([{"run": str(run), "filters": [
        {"selection": {"path": str(tmp_path / "picked.npy")}}, {"threshold": {"op": "<", "value": -1}}]}]),
        tmp_path / "both")
    assert _rows(tmp_path / "both", "kept") == [30] and both["combined"]["kept"] == 1


def test_selection_file_errors_name_the_file(tmp_path, capsys):
    run = make_run(tmp_path / "run", np.zeros((5, 1)))
    for name, content, message in (
            ("dup.txt", "1\n2\n1\n", "index 1 appears 2 times; each row may be selected once"),
            ("neg.txt", "3\n-1\n", "index -1 is negative: rows are 0-based rows of the canonical table"),
            ("word.txt", "3\nfour\n",
             "holds 'four', not an integer row index (one 0-based table row per line)"),
            ("absent.npy", None, "no such index file")):
        f = tmp_path / name
        if content is not None:
            f.write_text(content)
        assert main(["filter", "--run", str(run), "--selection", str(f), "-o", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err.strip() == f"drgn filter: error: {f}: {message}"
        assert not (tmp_path / "o").exists()


def test_workflow_declares_the_selection_as_a_filter_input(tmp_path):
    """The filter rule lists the selection file among its inputs: a config naming a missing selection is
    refused before any job, and a planned filter job shows the file (so editing it reruns the filter)."""
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["filter"]["pilots"][1]["filters"].append({"selection": {"path": "picked.txt", "keep": "outside"}})
    path = write_config(tmp_path, cfg)
    with pytest.raises(AssertionError, match=r"selection\.path': file picked\.txt does not exist"):
        dry_run(tmp_path, path)
    (tmp_path / "picked.txt").write_text("0\n1\n")
    jobs, out = dry_run(tmp_path, path, "results/filter/kept.npy")
    assert jobs["filter_particles"] == 1
    block = out[out.index("rule filter_particles:"):]
    block = block[:block.index("\n\n")]
    assert "picked.txt" in block.split("output:")[0], block
