"""The workflow with `input.poses: abinit`: a particle file without poses is imported with --no-poses,
drgn abinit finds the poses on the pilot stack, and its poses.star is the table of every later rule (pilots,
filter, high-res, analysis, export). Dry runs check the DAG; one tiny real run checks the abinit job."""

from __future__ import annotations

import copy
import shutil
import subprocess

import numpy as np
import pytest
from conftest_workflow import (
    CONVENTIONS,
    REPO,
    TINY_CONFIG,
    dry_run,
    env,
    planned_jobs,
    run_snakemake,
    snakemake_cmd,
    write_config,
)

from drgn_core.cli import main
from drgn_core.config_check import validate_config
from drgn_core.errors import DrgnError

POSES = "results/abinit/poses.star"


def _consumers_of_found_poses(out: str) -> None:
    """Every rule after the search reads the abinit table; only the import's table feeds the search and
    the downsampling."""
    for cmd in ("drgn train " + POSES, "drgn export " + POSES, "drgn analyze", "drgn filter"):
        assert cmd in out, cmd
    assert f"drgn train {POSES} results/data/particles.16.mrcs -o results/pilot/z1 " in out
    assert f"drgn train {POSES} results/data/particles.48.mrcs -o results/highres/train " in out
    assert "drgn downsample results/data/table.star -D 16 " in out
    assert ("drgn abinit results/data/table.star results/data/particles.16.mrcs -o results/abinit "
            "--auto-resume --zdim 0 --seed 3 --device auto --threads 1 --epochs 2") in out


def test_dry_run_star_mode_with_abinit(tmp_path):
    path = CONVENTIONS / "particles_relion31.star"
    cfg = write_config(tmp_path, {"input": {"mode": "star", "path": str(path), "poses": "abinit"},
                                  "abinit": {"seed": 3, "extra": "--epochs 2"},
                                  "pilot": {"D": 16}, "highres": {"D": 48}})
    jobs, out = dry_run(tmp_path, cfg)
    assert jobs["import_particles"] == 1 and jobs["abinit"] == 1 and jobs["train_pilot"] == 2
    assert jobs["export_kept"] == 1 and jobs["downsample"] == 2
    assert f"drgn import {path} -o results/data/table.star --no-poses >" in out
    _consumers_of_found_poses(out)


def test_abinit_config_problems_are_named():
    def problems(cfg: dict) -> str:
        with pytest.raises(DrgnError) as e:
            validate_config(cfg, check_files=False)
        return str(e.value)

    assert "key 'input.poses': abinit needs imported particles" in problems({"input": {"poses": "abinit"}})
    both = {"input": {"mode": "empiar", "poses": "abinit"},
            "empiar": {"accession": "EMPIAR-10076", "include": ["data/P.star"],
                       "particles": {"file": "data/P.star"}, "poses": {"file": "data/P.star"}}}
    assert "abinit finds the poses, but empiar.poses fetches them" in problems(both)


def test_example_config_checks_and_dry_runs_offline(tmp_path, capsys):
    """config/examples/empiar10076_abinit.yaml: valid, and its DAG (fetch → import --no-poses → abinit on the
    D 128 stack → pilots, high-res and export on the found poses) plans without the network."""
    path = REPO / "config" / "examples" / "empiar10076_abinit.yaml"
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: valid (empiar EMPIAR-10076; pilots zdim")
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        pytest.skip("cannot make a network namespace here")
    proc = subprocess.run(["unshare", "-n", *snakemake_cmd(tmp_path, path, "-n", "-p", "--cores", "2")],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    jobs = planned_jobs(out)
    assert jobs["fetch_empiar"] == 1 and jobs["abinit"] == 1 and jobs["train_pilot"] == 2
    r = "results/empiar10076_abinit"
    assert "--box 320 --no-poses >" in out
    assert f"drgn abinit {r}/data/table.star {r}/data/particles.128.mrcs -o {r}/abinit " in out
    assert f"drgn train {r}/abinit/poses.star {r}/data/particles.256.mrcs -o {r}/highres/train " in out
    assert f"drgn export {r}/abinit/poses.star " in out
    assert not (tmp_path / "data").exists()


def test_tiny_abinit_job_runs_and_feeds_the_pilots(tmp_path):
    """A real run of the import and abinit jobs on a STAR without poses: the import holds placeholders,
    the abinit table holds found poses (recorded as such), and the pilots are planned on it."""
    from drgn_core.io.star_format import read_star_blocks, write_star
    from drgn_core.io.table import read_table

    sim = tmp_path / "sim"
    subprocess.run(["drgn", "simulate", "-o", str(sim), "--n", "120", "-D", "32", "--snr", "1",
                    "--heterogeneity", "none", "--seed", "0"], env=env(), check=True, capture_output=True)
    blocks = read_star_blocks(sim / "particles.star")
    blocks["particles"] = blocks["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    write_star(blocks, sim / "ctf_only.star")
    tiny = copy.deepcopy(TINY_CONFIG)
    del tiny["simulate"]
    tiny["validate"] = {"n_fsc": 4, "ground_truth": False}
    cfg = write_config(tmp_path / "wf", {
        **tiny, "input": {"mode": "star", "path": str(sim / "ctf_only.star"), "poses": "abinit"},
        "abinit": {"extra": "--iterations 2 --soft-iterations 1 --minibatch 60 --base-rotations 576 --keep 2 "
                            "--local-levels 1 --epochs 1 --pose-start 1 --dec-dim 32 --dec-layers 1"}})
    wf = tmp_path / "wf"
    run_snakemake(wf, cfg, "--cores", "2", POSES, timeout=600)
    imported = read_table(wf / "results" / "data" / "table.star")
    assert np.allclose(imported.poses(), np.eye(3)) and imported.provenance.get("poses") == "none"
    found = read_table(wf / POSES)
    assert len(found) == 120 and found.provenance.get("abinit_run")
    angles = np.degrees(np.arccos(np.clip((np.trace(found.poses(), axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert np.median(angles) > 20          # searched poses, not the identity placeholders
    assert (wf / "results" / "abinit" / "confidence.npy").exists()
    jobs, out = dry_run(wf, cfg)
    assert "abinit" not in jobs and "import_particles" not in jobs and jobs["train_pilot"] == 2
    assert f"drgn train {POSES} results/data/particles.16.mrcs -o results/pilot/z1 " in out
