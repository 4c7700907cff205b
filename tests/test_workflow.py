"""The Snakemake workflow: lint, DAGs of every input mode, config validation, summary, re-run semantics.

Fast tests check the workflow's structure (lint, dry-runs, validation messages, the summary table on
hand-made files). The slow ones share one complete run of the whole DAG on a tiny simulated dataset
(`completed_run`) and check what users rely on between runs: a finished run has nothing left to do; a
changed filter setting reruns only the filter and what follows it; a run killed during high-res training
is refused until --rerun-incomplete, which then finishes it without retraining the pilots; and the same
config and seed give the same kept particles.
"""

from __future__ import annotations

import base64
import copy
import csv
import html
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest_workflow import (
    BIN,
    CONVENTIONS,
    REPO,
    SNAKEFILE,
    TINY_CONFIG,
    dry_run,
    env,
    planned_jobs,
    run_snakemake,
    snakemake_cmd,
    write_config,
)

from drgn_core.cli import main
from drgn_core.config_check import (
    check_config_file,
    filter_spec,
    load_schema,
    load_yaml,
    validate_config,
)
from drgn_core.errors import InputError

# Rules downstream of the filter (what a changed filter setting must rerun), and upstream of it.
DOWNSTREAM_OF_FILTER = {"write_filter_spec", "filter_particles", "train_highres", "analyze_highres",
                        "traverse_highres", "backproject_kept", "evaluate_highres", "export_kept",
                        "landscape_highres", "summarize", "all"}
UPSTREAM_OF_FILTER = {"simulate_particles", "downsample", "train_pilot", "evaluate_pilot"}


# ---- structure ----------------------------------------------------------------------------------------

def test_lint_is_clean():
    proc = subprocess.run(snakemake_cmd(REPO, None, "--lint"), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition" in proc.stdout + proc.stderr


def test_snakefmt_formatting():
    pytest.importorskip("snakefmt")
    files = [str(SNAKEFILE), *map(str, sorted((REPO / "workflow" / "rules").glob("*.smk")))]
    proc = subprocess.run([str(BIN / "snakefmt"), "--check", *files],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dry_run_simulate_mode(tmp_path):
    cfg = write_config(tmp_path, {})  # every key from the schema's defaults
    jobs, out = dry_run(tmp_path, cfg)
    assert jobs == {"simulate_particles": 1, "downsample": 2, "train_pilot": 2, "write_filter_spec": 1,
                    "filter_particles": 1, "train_highres": 1, "analyze_highres": 1, "landscape_highres": 1,
                    "traverse_highres": 1,
                    "backproject_kept": 1, "evaluate_highres": 1, "evaluate_pilot": 2, "export_kept": 1,
                    "summarize": 1, "all": 1}
    # the paper's DAG: both pilots at the pilot box, high-res on the kept rows, GT metrics when simulated
    assert "--zdim 1 " in out and "--zdim 10 " in out
    assert "results/data/particles.32.mrcs" in out and "results/data/particles.64.mrcs" in out
    assert "--ind results/filter/kept.npy" in out
    assert "--val-frac 0.0" in out  # every kept particle trained on: held-out latents would be noise
    assert "--source results/simulated/particles.star" in out


def test_logs_and_benchmarks_follow_the_results_folder(tmp_path):
    """Two configs run from one directory with different `results` keep their own logs and run times."""
    cfg = write_config(tmp_path, {"results": "run_b", "pilot": {"train": {"epochs": 3, "enc_dim": 64}},
                                  "highres": {"zdim": 8, "train": {"extra": "--precision fp32"}}})
    jobs, out = dry_run(tmp_path, cfg)
    assert jobs["train_pilot"] == 2
    for log in ["run_b/logs/simulate/simulate.log", "run_b/logs/pilot/z1.log", "run_b/logs/pilot/z10.log",
                "run_b/logs/highres/train.log", "run_b/logs/summarize/summarize.log"]:
        assert f"> {log} 2>&1" in out, log
    assert "--benchmarks run_b/benchmarks -o run_b/report/summary.json" in out
    # one function builds both stages' `drgn train` flags from their own config sections
    assert ("-o run_b/pilot/z1 --auto-resume --zdim 1 --epochs 3 --enc-dim 64 --enc-layers 3 --dec-dim 256 "
            "--dec-layers 3 --batch-size 16 --lr 0.0001 --seed 0 --val-frac 0.0 --device auto --threads 1 "
            "> run_b/logs/pilot/z1.log") in out
    assert ("-o run_b/highres/train --auto-resume --ind run_b/filter/kept.npy --zdim 8 --epochs 20 "
            "--enc-dim 256 --enc-layers 3 --dec-dim 256 --dec-layers 3 --batch-size 16 --lr 0.0001 --seed 0 "
            "--val-frac 0.0 --device auto --precision fp32 --threads 1 > run_b/logs/highres/train.log") in out
    assert "logs/" not in out.replace("run_b/logs/", "")


@pytest.mark.parametrize("mode, source", [("star", "particles_relion31.star"), ("cs", "particles.cs")])
def test_dry_run_import_modes(tmp_path, mode, source):
    path = CONVENTIONS / source
    cfg = write_config(tmp_path, {"input": {"mode": mode, "path": str(path), "apix": 3.0, "invert": True},
                                  "pilot": {"D": 16}, "highres": {"D": 48}})
    jobs, out = dry_run(tmp_path, cfg)
    assert jobs["import_particles"] == 1
    assert not {"simulate_particles", "evaluate_highres", "evaluate_pilot"} & set(jobs)  # no ground truth
    assert jobs["downsample"] == 2 and jobs["train_pilot"] == 2 and jobs["export_kept"] == 1
    assert f"drgn import {path} -o results/data/table.star --apix 3.0 --invert" in out
    assert f"--source {path}" in out  # the export subsets the user's own file


# ---- configuration -------------------------------------------------------------------------------------

def _keys_missing(schema: dict, node: dict, path: str, what: str) -> list[str]:
    missing = []
    for name, sub in node.get("properties", {}).items():
        key = f"{path}.{name}" if path else name
        required = name in node.get("required", [])
        if "description" not in sub:
            missing.append(f"{key}: description")
        if what == "default" and "default" not in sub and not required:
            missing.append(f"{key}: default")
        target = sub
        if "$ref" in sub:
            target = schema["$defs"][sub["$ref"].split("/")[-1]]
        missing += _keys_missing(schema, target, key, what)
        if "items" in target:
            items = target["items"]
            if "$ref" in items:
                items = schema["$defs"][items["$ref"].split("/")[-1]]
            missing += _keys_missing(schema, items, key + "[]", what)
    return missing


def test_schema_describes_every_key_and_defaults_every_optional_one():
    schema = load_schema()
    assert _keys_missing(schema, schema, "", "description") == []
    # Keys without a default are present only when chosen: the filter kinds (a filter is exactly one of
    # them), how a GMM names what it removes (ids, or a rule with its count n or factor, and its
    # separation), k-means' ids and separation (either or both), a box's edges and optional UMAP file (a
    # missing edge is open).
    item = "filter.pilots[].filters[]"
    kinds = ("threshold", "gmm", "kmeans", "norm", "box", "selection", "abinit_confidence")
    alternatives = [f"{item}.{k}: default" for k in kinds]
    alternatives += [f"{item}.gmm.remove.{k}: default" for k in ("ids", "rule", "n", "factor", "separation")]
    alternatives += [f"{item}.kmeans.{k}: default" for k in ("remove_ids", "separation")]
    alternatives += [f"{item}.box.{k}: default" for k in ("xmin", "xmax", "ymin", "ymax", "umap")]
    alternatives += [f"{item}.abinit_confidence.run: default"]  # found through the table when left out
    assert sorted(_keys_missing(schema, schema, "", "default")) == sorted(alternatives)


def test_default_config_spells_out_every_key():
    demo = load_yaml(REPO / "config" / "config.yaml")
    filled = validate_config(copy.deepcopy(demo), check_files=False)
    assert filled == demo  # nothing was added: the demo config documents every key


def test_empty_config_takes_schema_defaults():
    cfg = validate_config({}, check_files=False)
    assert cfg["input"]["mode"] == "simulate"
    assert cfg["pilot"]["zdims"] == [1, 10] and cfg["pilot"]["train"]["lr"] == pytest.approx(1e-4)
    assert cfg["resources"]["highres"]["gpus"] == 1
    # defaults are copies: filling one section never aliases another
    cfg["pilot"]["train"]["epochs"] = 99
    assert cfg["highres"]["train"]["epochs"] == 20


@pytest.mark.parametrize("config, message", [
    ({"pilot": {"epoch": 3}}, "key 'pilot': unknown key 'epoch' (allowed: D, train, val_frac, zdims)"),
    ({"colour": 1}, "top level: unknown key 'colour'"),
    ({"pilot": {"D": "32"}}, "key 'pilot.D': expected an integer, found '32'"),
    ({"pilot": {"train": {"lr": "1e-4"}}}, "key 'pilot.train.lr': expected a number, found '1e-4' "
                                          "(YAML reads 1e-4 as text: write 1.0e-4)"),
    ({"highres": {"val_frac": 0.9}}, "key 'highres.val_frac': 0.9 is out of range (must be at most 0.5)"),
    ({"input": {"mode": "mrc"}}, "key 'input.mode': 'mrc' is not one of simulate, star, cs"),
    ({"pilot": {"zdims": [1, 1]}}, "key 'pilot.zdims': items must be unique"),
    ({"filter": {"pilots": [{"zdim": 1, "filters": [{"gmm": {}, "norm": {}}]}]}},
     "key 'filter.pilots[0].filters[0]': a filter is one key naming its kind"),
    ({"filter": {"pilots": [{"zdim": 1, "filters": [{"median": {}}]}]}},
     "key 'filter.pilots[0].filters[0]': unknown key 'median' "
     "(allowed: abinit_confidence, box, gmm, kmeans, norm, selection, threshold)"),
    # cross-field rules
    ({"pilot": {"D": 32}, "highres": {"D": 33}}, "key 'highres.D': box size 33 must be even"),
    ({"pilot": {"D": 64}, "highres": {"D": 48}},
     "key 'pilot.D': the pilot box 64 is larger than highres.D = 48"),
    ({"highres": {"D": 128}}, "key 'highres.D': 128 is larger than the original box simulate.D = 64"),
    ({"filter": {"pilots": [{"zdim": 2, "filters": [{"norm": {}}]}]}},
     "key 'filter.pilots[0].zdim': no pilot with zdim 2 (pilot.zdims is [1, 10])"),
    ({"filter": {"pilots": [{"zdim": 1, "filters": [{"threshold": {"dim": 1, "value": 0}}]}]}},
     "key 'filter.pilots[0].filters[0].threshold.dim': 1 is not a dimension of a zdim 1 latent (0..0)"),
    ({"input": {"mode": "star"}}, "key 'input.path': input.mode star needs the .star file to import"),
    ({"input": {"mode": "cs", "path": "x.star"}}, "key 'input.path': input.mode cs expects a .cs file"),
    ({"input": {"mode": "star", "path": "nowhere.star"}},
     "key 'input.path': file nowhere.star does not exist"),
    ({"traverse": {"anchors": [5]}}, "key 'traverse.anchors': give at least two anchors"),
])
def test_config_errors_name_the_key(tmp_path, config, message):
    with pytest.raises(InputError) as e:
        validate_config(config, source="my.yaml", base=tmp_path)
    text = str(e.value)
    assert text.startswith("my.yaml: 1 problem in the workflow config: ")
    assert message in text


def test_config_lists_every_problem_at_once():
    with pytest.raises(InputError) as e:
        validate_config({"pilot": {"D": "x", "epoch": 1}, "highres": {"zdim": 0}})
    assert str(e.value) == (
        "3 problems in the workflow config: "
        "key 'highres.zdim': 0 is out of range (must be at least 1); "
        "key 'pilot': unknown key 'epoch' (allowed: D, train, val_frac, zdims); "
        "key 'pilot.D': expected an integer, found 'x'")


def test_check_config_command(tmp_path, capsys):
    assert main(["check-config", str(REPO / "config" / "config.yaml")]) == 0
    assert "valid (simulated; pilots zdim 1, 10 at D=32" in capsys.readouterr().out
    for example in sorted((REPO / "config" / "examples").glob("*.yaml")):
        assert main(["check-config", str(example), "--no-file-checks"]) == 0, example
    bad = tmp_path / "bad.yaml"
    bad.write_text("pilot:\n  D: 33\n")
    assert main(["check-config", str(bad)]) == 2
    assert capsys.readouterr().err == (f"drgn check-config: error: {bad}: 1 problem in the workflow config: "
                                       "key 'pilot.D': box size 33 must be even\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("pilot: [1, 2\n")
    assert main(["check-config", str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["check-config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: config file not found" in capsys.readouterr().err


def test_print_defaults_round_trips(tmp_path, capsys):
    cfg = write_config(tmp_path, {"pilot": {"D": 16}})
    assert main(["check-config", str(cfg), "--print-defaults"]) == 0
    full = yaml.safe_load(capsys.readouterr().out)
    assert full["pilot"]["D"] == 16 and full["highres"]["train"]["enc_dim"] == 256
    assert check_config_file(write_config(tmp_path, full, "full.yaml")) == full


def test_workflow_stops_on_a_bad_config_before_any_job(tmp_path):
    cfg = write_config(tmp_path, {"pilot": {"D": 33}})
    proc = run_snakemake(tmp_path, cfg, "-n", "--cores", "1", check=False)
    assert proc.returncode != 0
    assert "key 'pilot.D': box size 33 must be even" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_filter_spec_from_config():
    cfg = validate_config({"results": "out", "filter": {"combine": "union", "pilots": [
        {"zdim": 10, "filters": [{"norm": {"k_std": 2.5}}, {"kmeans": {"k": 8, "remove_ids": [3]}}]}]}},
        check_files=False)
    assert filter_spec(cfg) == {"combine": "union", "runs": [
        {"run": "out/pilot/z10", "combine": "union", "filters": [{"norm": {"k_std": 2.5}},
                                             {"kmeans": {"k": 8, "seed": 0, "remove_ids": [3]}}]}]}


def test_filter_specs_from_every_shipped_config_parse_in_drgn_filter():
    """The config schema and `drgn filter`'s own spec parser agree on every filter the configs use."""
    from drgn_core.filtering import parse_spec

    configs = [REPO / "config" / "config.yaml", *sorted((REPO / "config" / "examples").glob("*.yaml"))]
    for path in configs:
        cfg = validate_config(load_yaml(path), check_files=False)
        spec = parse_spec(filter_spec(cfg))
        assert [str(r.run) for r in spec.runs] == [f"{cfg['results']}/pilot/z{p['zdim']}"
                                                   for p in cfg["filter"]["pilots"]], path
    every_kind = validate_config({"filter": {"pilots": [{"zdim": 10, "filters": [
        {"threshold": {"dim": 3, "op": ">", "value": 2.0}},
        {"gmm": {"components": 4, "remove": {"ids": [1, 2]}}},
        {"kmeans": {"k": 6, "remove_ids": [0]}},
        {"norm": {"k_std": 2}},
        {"box": {"space": "pca", "xmin": -1.0, "ymax": 2.0, "keep": "outside"}}]}]}}, check_files=False)
    spec = parse_spec(filter_spec(every_kind))
    assert [f.kind for f in spec.runs[0].filters] == ["threshold", "gmm", "kmeans", "norm", "box"]


# ---- the summary table ---------------------------------------------------------------------------------

def _fake_run(folder: Path, zdim: int, epochs: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model": {"zdim": zdim, "D": 32, "enc_dim": 64, "enc_layers": 3, "dec_dim": 128, "dec_layers": 2},
        "training": {"epochs": epochs},
        "inputs": {"n_particles": 90, "n_train": 81, "n_val": 9}}))
    lines = ["epoch,loss,mse,kl,val_loss,val_mse,val_kl,images_per_s,seconds"]
    lines += [f"{e},{1.0 / e},0,0,{1.5 / e},0,0,100.5,{10 * e}" for e in range(1, epochs + 1)]
    (folder / "train_log.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_summarize_reads_every_stage(tmp_path):
    from drgn_core.summary import to_rst

    filt = tmp_path / "filter"
    filt.mkdir()
    np.save(filt / "kept.npy", np.arange(90, dtype=np.int64))
    np.save(filt / "removed.npy", np.arange(90, 100, dtype=np.int64))
    (filt / "filter.json").write_text(json.dumps({
        "spec": {}, "runs": [{"run": "results/pilot/z10", "filters": [{"filter": "gmm", "removed": 10}],
                              "kept": 90}],
        "combined": {"how": "intersection", "particles": 100, "kept": 90, "removed": 10},
        "ground_truth": {"precision": 0.9, "recall": 0.75, "f1": 0.8182, "true_junk": 12}}))
    _fake_run(tmp_path / "pilot" / "z1", 1, 3)
    _fake_run(tmp_path / "highres", 10, 4)
    bp = tmp_path / "bp"
    bp.mkdir()
    (bp / "fsc.json").write_text(json.dumps({"n_particles": 90, "D": 32, "apix": 6.0,
                                             "resolution_0.143_A": 14.5, "resolution_0.5_A": 20.0,
                                             "masked": {"resolution_0.143_A": 13.0}, "fsc": [1.0, 0.5]}))
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({
        "run": "results/highres/train", "n_particles": 90, "spearman": {"value": 0.97, "summary": "PC1"},
        "clustering": {"ari": None, "reason": "one state"},
        "per_image_fsc": {"auc_mean": 0.31, "auc_std": 0.02, "freq": [0.0, 0.1]}}))
    bench = tmp_path / "benchmarks"
    (bench / "pilot").mkdir(parents=True)
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    (bench / "pilot" / "z1.tsv").write_text(header + "12.5\t0:00:12\t300.2\t1\t1\t1\t0\t0\t90\t11\n")
    (bench / "pilot" / "z10.tsv").write_text(header + "7.5\t0:00:07\tNA\t-\t-\t-\t-\t-\t-\t-\n")
    (bench / "summarize.tsv").write_text(header + "99\t0:01:39\t1\t1\t1\t1\t0\t0\t9\t9\n")  # not read
    out = tmp_path / "report" / "summary.json"
    html = tmp_path / "report" / "summary.html"
    rst = tmp_path / "report" / "summary.rst"
    assert main(["summarize", "--filter-dir", str(filt), "--pilot", str(tmp_path / "pilot" / "z1"),
                 "--highres", str(tmp_path / "highres"), "--backproject", str(bp), "--metrics", str(metrics),
                 "--benchmarks", str(bench), "-o", str(out), "--html", str(html), "--rst", str(rst)]) == 0
    s = json.loads(out.read_text())
    assert s["headline"] == {"kept": 90, "removed": 10, "junk filter precision": 0.9,
                             "junk filter recall": 0.75, "junk filter F1": 0.8182,
                             "|Spearman ρ|, highres/train": 0.97, "back-projection GSFSC 0.143 (Å)": 14.5,
                             "job time, all jobs (s)": 20.0}
    assert s["explore"] == f"drgn explore {tmp_path / 'highres'}"
    assert s["particles"] == {"kept": 90, "removed": 10}
    assert s["filter"] == {"pilot/z10: gmm removed": 10, "pilot/z10: kept": 90,
                           "combined (intersection): kept": 90, "combined (intersection): removed": 10,
                           "junk filter true junk": 12, "junk filter precision": 0.9,
                           "junk filter recall": 0.75, "junk filter f1": 0.8182}
    pilot, high = s["training"]
    assert (pilot["run"], pilot["zdim"], pilot["epochs"], pilot["train_seconds"]) == ("pilot z1", 1, 3, 60.0)
    assert (high["epochs"], high["final_loss"], high["final_val_loss"]) == (4, 0.25, 0.375)
    assert high["encoder"] == "64×3" and high["decoder"] == "128×2" and high["validation"] == 9
    assert s["backprojection"] == {"n_particles": 90, "D": 32, "apix": 6.0, "gsfsc_0.143_A": 14.5,
                                   "gsfsc_0.5_A": 20.0, "gsfsc_0.143_masked_A": 13.0}
    assert s["ground_truth"] == [{"run": "highres/train", "particles": 90,
                                  "|Spearman ρ| vs GT coordinate": 0.97, "latent summary": "PC1",
                                  "per-image FSC-AUC, mean": 0.31, "per-image FSC-AUC, std": 0.02}]
    assert s["runtimes"] == [{"stage": "pilot", "job": "z1", "seconds": 12.5, "max_rss_mb": 300.2},
                             {"stage": "pilot", "job": "z10", "seconds": 7.5, "max_rss_mb": None}]
    page = html.read_text()
    assert "<td>|Spearman ρ| vs GT coordinate</td><td>0.97</td>" in page and "<td>14.5</td>" in page
    assert "<td>NMI</td>" not in page  # metrics a run does not have are left out
    assert page.count("<h2>Filter</h2>") == 1
    assert f"<pre><code>drgn explore {tmp_path / 'highres'}</code></pre>" in page
    assert rst.read_text() == to_rst(s) and "   * - junk filter F1\n     - 0.8182" in rst.read_text()


def test_summarize_errors_name_the_file(tmp_path, capsys):
    assert main(["summarize", "--highres", str(tmp_path / "nope"), "-o", str(tmp_path / "s.json")]) == 2
    assert capsys.readouterr().err.strip() == f"drgn summarize: error: {tmp_path / 'nope'}: folder not found"
    (tmp_path / "run").mkdir()
    assert main(["summarize", "--highres", str(tmp_path / "run"), "-o", str(tmp_path / "s.json")]) == 2
    assert "has no config.yaml: not a drgn train run directory" in capsys.readouterr().err
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    assert main(["summarize", "--metrics", str(bad), "-o", str(tmp_path / "s.json")]) == 2
    assert f"{bad}: not valid JSON (line 1" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


# ---- one complete run, shared by the re-run tests ----------------------------------------------------------

@pytest.fixture(scope="module")
def completed_run(tmp_path_factory) -> tuple[Path, Path]:
    """The whole DAG on the tiny config (module-scoped: one run serves every test below)."""
    workdir = tmp_path_factory.mktemp("workflow_run")
    cfg = write_config(workdir, TINY_CONFIG)
    run_snakemake(workdir, cfg, "--cores", "2", timeout=1500)
    return workdir, cfg


@pytest.mark.slow
def test_full_run_outputs(completed_run):
    workdir, _ = completed_run
    r = workdir / "results"
    for f in ["simulated/table.star", "data/particles.16.mrcs", "data/particles.32.mrcs", "pilot/z1/z.npy",
              "pilot/z10/z.npy", "filter/kept.npy", "highres/train/model.pt", "validation/metrics.json",
              "validation/backproject/map.mrc", "report/summary.json", "report/summary.html"]:
        assert (r / f).is_file(), f
    assert any((r / "export").iterdir()) and any((r / "highres" / "analyze").glob("*.png"))
    summary = json.loads((r / "report" / "summary.json").read_text())
    p = summary["particles"]
    assert p["input"] == 400 and p["junk_injected"] == 60 and p["kept"] + p["removed"] == 400
    kept = np.load(r / "filter" / "kept.npy")
    assert p["kept"] == len(kept)
    high = summary["training"][-1]
    assert high["run"] == "high-res" and high["epochs"] == 3
    assert high["train"] + high["validation"] == len(kept)  # the high-res run trained on the kept rows only
    stages = {b["stage"] for b in summary["runtimes"]}
    assert {"simulate", "downsample", "pilot", "filter", "highres", "analyze"} <= stages
    # logs and benchmarks live under the results folder (two configs in one directory keep their own), and
    # the summary's run times are read from there: one row per benchmark file of a stage's jobs
    for stage in ["simulate", "pilot", "filter", "highres", "analyze", "traverse", "validate", "export"]:
        assert any((r / "logs" / stage).glob("*.log")), stage
        assert any((r / "benchmarks" / stage).glob("*.tsv")), stage
    assert (r / "benchmarks" / "summarize.tsv").is_file()
    assert not (workdir / "logs").exists() and not (workdir / "benchmarks").exists()
    benchmarked = {(f.parent.name, f.stem) for f in (r / "benchmarks").glob("*/*.tsv")}
    assert {(b["stage"], b["job"]) for b in summary["runtimes"]} == benchmarked
    assert ("pilot", "z1") in benchmarked and ("pilot", "z10") in benchmarked


@pytest.mark.slow
def test_report_builds(completed_run):
    workdir, cfg = completed_run
    run_snakemake(workdir, cfg, "--report", "report.html", timeout=300)
    check_report(workdir, workdir / "report.html")


def _report_data(page: str) -> tuple[dict, dict]:
    """The report's embedded items (path -> labels, data URI, …) and its categories (JSON in <script>)."""
    found = {}
    for var in ("results", "categories"):
        m = re.search(rf"var {var} = (\{{.*?\}});?\s*\n", page)
        assert m, f"no `var {var}` in the report"
        found[var] = json.loads(m.group(1))
    return found["results"], found["categories"]


def _embedded(item: dict) -> bytes:
    return base64.b64decode(item["data_uri"].split("base64,", 1)[1])


def _html_tables(page: str) -> dict[str, list[list[str]]]:
    """The summary page's tables by their <h2> title: rows of cell texts (header row first)."""
    tables = {}
    for title, body in re.findall(r"<h2>([^<]*)</h2><table>(.*?)</table>", page, re.S):
        rows = [[html.unescape(c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)]
                for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]
        assert title not in tables, f"table {title!r} shown twice"
        tables[html.unescape(title)] = rows
    return tables


def _cell(text: str) -> float | None:
    """A formatted number of the summary page ("1,234", "0.3333", "–" for none)."""
    return None if text == "–" else float(text.replace(",", ""))


def _same(cell: str, value) -> bool:
    """A cell shows `value` to the 4 significant digits the page prints (None: the cell is empty)."""
    return _cell(cell) is None if value is None else _cell(cell) == pytest.approx(value, rel=5e-4, abs=1e-9)


def check_report(workdir: Path, report: Path) -> None:
    """What a reader of the report must find, each value traced back to the stage output that holds it:
    every figure the workflow wrote (the map contact sheets of every decoded series among them), the
    summary table's counts, filter scores, |Spearman ρ|, resolution, epochs and job time, and the command
    that opens the run in the explorer."""
    r = workdir / "results"
    items, categories = _report_data(report.read_text(errors="replace"))
    # every figure, byte for byte
    pngs = sorted(p.relative_to(workdir).as_posix() for p in r.rglob("*.png"))
    assert len(pngs) >= 15 and not set(pngs) - set(items), set(pngs) - set(items)
    for name in pngs:
        assert _embedded(items[name]) == (workdir / name).read_bytes(), name
    # every series of decoded maps is pictured, and the pictures are gathered in their own category
    series = sorted({p.parent for p in (r / "highres").rglob("vol_*.mrc")})
    assert {s.relative_to(r).as_posix() for s in series} >= {"highres/analyze/kmeans4", "highres/analyze/pc1",
                                                              "highres/traverse/volumes"}
    sheets = {(s / "maps.png").relative_to(workdir).as_posix() for s in series}
    assert set(categories["4. Maps"]["Other"]) == sheets
    assert items["results/highres/analyze/kmeans4/maps.png"]["labels"] == {
        "figure": "maps: k-means centres, k = 4 (kmeans4/)"}
    assert items["results/highres/landscape/vol_pc1/maps.png"]["labels"] == {
        "figure": "maps: landscape, along volume PC1 (vol_pc1/)"}
    assert "results/highres/landscape/states/means.png" in categories["5. Landscape"]["Other"]

    # the summary table, against the files the stages wrote
    page = _embedded(items["results/report/summary.html"]).decode()
    assert page == (r / "report" / "summary.html").read_text()
    assert "<pre><code>drgn explore results/highres/train</code></pre>" in page
    tables = _html_tables(page)
    key = {row[0]: row[1] for row in tables["Key results"][1:]}
    kept, removed = np.load(r / "filter" / "kept.npy"), np.load(r / "filter" / "removed.npy")
    n = TINY_CONFIG["simulate"]["n"]
    assert _same(key["particles in"], n)
    assert _same(key["kept"], len(kept)) and _same(key["removed"], len(removed))
    assert len(kept) + len(removed) == n
    gt = json.loads((r / "filter" / "filter.json").read_text())["ground_truth"]
    for label, field in (("junk filter precision", "precision"), ("junk filter recall", "recall"),
                         ("junk filter F1", "f1")):
        assert _same(key[label], gt[field]), (label, key[label], gt[field])
    particles = {row[0]: row[1] for row in tables["Particles"][1:]}
    junk = round(n * TINY_CONFIG["simulate"]["junk_fraction"])
    assert _same(particles["junk injected (ground truth)"], junk)
    assert _same(particles["junk injected (ground truth)"], gt["true_junk"])
    metric_files = {"highres/train": r / "validation" / "metrics.json",
                    **{f"pilot/z{z}": r / "validation" / f"metrics_pilot_z{z}.json"
                       for z in TINY_CONFIG["pilot"]["zdims"]}}
    gt_table = tables["Ground-truth metrics"]
    rho_row = next(row for row in gt_table if row[0] == "|Spearman ρ| vs GT coordinate")
    for run, path in metric_files.items():
        rho = json.loads(path.read_text())["spearman"]["value"]
        assert _same(key[f"|Spearman ρ|, {run}"], rho), run
        assert _same(rho_row[gt_table[0].index(run)], rho), run
    fsc = json.loads((r / "validation" / "backproject" / "fsc.json").read_text())
    assert _same(key["back-projection GSFSC 0.143 (Å)"], fsc["resolution_0.143_A"])
    bp = {row[0]: row[1] for row in tables["Back-projection of the kept particles"][1:]}
    assert _same(bp["gsfsc_0.143_masked_A"], fsc["masked"]["resolution_0.143_A"])
    assert _same(bp["n_particles"], len(kept))
    # training: one row per run, epochs = rows of its log, the high-res run trained on the kept particles
    header, *rows = tables["Training"]
    col = {h: i for i, h in enumerate(header)}
    runs = {f"pilot z{z}": r / "pilot" / f"z{z}" for z in TINY_CONFIG["pilot"]["zdims"]}
    runs["high-res"] = r / "highres" / "train"
    assert [row[0] for row in rows] == list(runs)
    for row in rows:
        with open(runs[row[0]] / "train_log.csv") as f:
            log = list(csv.DictReader(f))
        assert _same(row[col["epochs"]], len(log)) and _same(row[col["final loss"]], float(log[-1]["loss"]))
    high = rows[-1]
    assert _cell(high[col["train"]]) + _cell(high[col["validation"]]) == len(kept)
    # job time: the sum of Snakemake's benchmark files of the stages (the summary's own is not counted)
    bench = [p for p in workdir.rglob("*.tsv") if p.parent.parent.name == "benchmarks"]
    seconds = [round(float(next(csv.DictReader(open(p), delimiter="\t"))["s"]), 1) for p in bench]
    assert len(bench) >= 10 and _same(key["job time, all jobs (s)"], sum(seconds))
    assert len(tables["Run times (Snakemake benchmarks)"]) == len(bench) + 2   # header and total
    # the landscape's state table: one row per state, counts from its summary.json, adding up to the run
    ls = json.loads((r / "highres" / "landscape" / "summary.json").read_text())
    [state_rows] = [rows for t, rows in tables.items() if t.startswith("Landscape states")]
    assert [_cell(row[1]) for row in state_rows[1:]] == ls["states"]["counts"]
    assert sum(ls["states"]["counts"]) == _cell(high[col["train"]]) + _cell(high[col["validation"]])


@pytest.mark.slow
def test_completed_run_has_nothing_to_do(completed_run):
    workdir, cfg = completed_run
    jobs, out = dry_run(workdir, cfg)
    assert jobs == {}, out


@pytest.mark.slow
def test_changed_filter_reruns_only_downstream(completed_run):
    workdir, _ = completed_run
    changed = copy.deepcopy(TINY_CONFIG)
    changed["filter"]["pilots"][0]["filters"][0]["norm"]["k_std"] = 2.5
    cfg = write_config(workdir, changed, "changed.yaml")
    jobs, out = dry_run(workdir, cfg)
    assert set(jobs) == DOWNSTREAM_OF_FILTER, out
    assert not set(jobs) & UPSTREAM_OF_FILTER, out


@pytest.mark.slow
def test_killed_highres_training_resumes_without_redoing_pilots(completed_run):
    """Kill the whole Snakemake process group during high-res training, after its first checkpoint: the run
    is refused as incomplete, then --rerun-incomplete finishes it without redoing the pilots, and the
    training job continues from its checkpoint (drgn train --auto-resume) instead of starting over."""
    workdir, _ = completed_run
    pilots = sorted((workdir / "results" / "pilot").glob("z*/model.pt"))
    before = {p: p.stat().st_mtime_ns for p in pilots}
    # frequent mid-epoch checkpoints so that one exists early; changing the options reruns train_highres
    changed = copy.deepcopy(TINY_CONFIG)
    changed["highres"]["train"]["extra"] = "--checkpoint-minutes 0.0005"
    cfg = write_config(workdir, changed, "checkpointing.yaml")
    log = workdir / "results" / "logs" / "highres" / "train.log"
    ck = workdir / "results" / "highres" / "train" / "checkpoints" / "last.pt"
    log_mtime = log.stat().st_mtime_ns
    proc = subprocess.Popen(snakemake_cmd(workdir, cfg, "--cores", "2"),
                            cwd=workdir, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (log.exists() and log.stat().st_mtime_ns != log_mtime and "training on" in log.read_text()
                    and ck.exists()):
                break
            time.sleep(0.05)
        else:
            pytest.fail("high-res training did not checkpoint within 120 s")
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (ck.parent.parent / "model.pt").exists(), "training finished before it was killed"
    # the killed Snakemake left its lock (users run --unlock too); the half-trained run is then refused as
    # incomplete, and --rerun-incomplete plans it again without the pilots
    run_snakemake(workdir, cfg, "--unlock")
    refused = run_snakemake(workdir, cfg, "-n", "--cores", "2", check=False)
    assert refused.returncode != 0 and "incomplete" in (refused.stdout + refused.stderr).lower()
    jobs, out = dry_run(workdir, cfg, "--rerun-incomplete")
    assert "train_highres" in jobs and not set(jobs) & UPSTREAM_OF_FILTER, out
    run_snakemake(workdir, cfg, "--cores", "2", "--rerun-incomplete", timeout=1200)
    assert "resuming" in log.read_text(), log.read_text()[-2000:]
    assert {p: p.stat().st_mtime_ns for p in pilots} == before
    assert dry_run(workdir, cfg)[0] == {}


@pytest.mark.slow
def test_same_config_and_seed_reproduce_the_kept_set(completed_run, tmp_path):
    workdir, _ = completed_run
    cfg = write_config(tmp_path, TINY_CONFIG)
    run_snakemake(tmp_path, cfg, "--cores", "2", "results/filter/kept.npy", timeout=900)
    first = np.load(workdir / "results" / "filter" / "kept.npy")
    second = np.load(tmp_path / "results" / "filter" / "kept.npy")
    assert np.array_equal(first, second)
    assert 0 < len(first) < TINY_CONFIG["simulate"]["n"]


def test_planned_jobs_parser():
    text = ("Job stats:\njob                 count\n----------------  -------\ndownsample                2\n"
            "train_pilot               2\ntotal                     4\n\nReasons:\n")
    assert planned_jobs(text) == {"downsample": 2, "train_pilot": 2}
    assert planned_jobs("Nothing to be done (all requested files are present and up to date).") == {}
