"""The workflow on a real SLURM cluster: one node on localhost, the SLURM profile, jobs sent by sbatch.

The module fixture brings the cluster up with scripts/slurm/up.sh (Debian's slurm-wlm and munge, installed
when missing; one node with a fake GPU) and always shuts it down with scripts/slurm/down.sh, which stops
exactly the daemons it started. The test then runs the default workflow — config/config.yaml as shipped,
with only the memory requests lowered to fit a small CI machine's node, and the high-res training run as
two data-parallel CPU processes (gloo, highres.processes: 2) — with `--profile profiles/slurm`
under `timeout -s INT`, checks that training jobs went to the GPU partition with a GPU and the others did
not, and that the report's ground-truth metrics are those the README promises (junk-filter F1 >= 0.9,
high-res |Spearman rho| >= 0.85). It skips, saying why, only where the packages cannot be installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml
from conftest_workflow import REPO, env, job_logs, snakemake_cmd, write_config

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

UP = REPO / "scripts" / "slurm" / "up.sh"
DOWN = REPO / "scripts" / "slurm" / "down.sh"
PROFILE = REPO / "profiles" / "slurm"
TRAINING_RULES = {"train_pilot", "train_highres"}


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """SLURM_CONF of a running single-node cluster; its daemons are stopped afterwards, pass or fail."""
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to bring up the SLURM cluster")
    state = tmp_path_factory.mktemp("slurm")
    try:
        proc = subprocess.run(["bash", str(UP), str(state)], capture_output=True, text=True, timeout=900)
        if proc.returncode == 3:
            pytest.skip(f"SLURM cannot be installed here: {proc.stderr.strip().splitlines()[-1]}")
        assert proc.returncode == 0, f"up.sh failed ({proc.returncode}):\n{proc.stderr}"
        assert re.search(r"export SLURM_CONF=\S+", proc.stdout), proc.stdout
        yield {"SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(DOWN), str(state)], capture_output=True, text=True, timeout=120)
        assert not (state / "pids").exists()


def _jobs(slurm_env: dict) -> dict[str, dict[str, str]]:
    """Every job the controller still remembers (MinJobAge keeps finished ones), by job id."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, env=slurm_env,
                         timeout=30).stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


def test_workflow_runs_on_slurm(slurm_cluster, tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())  # the default workflow
    # memory requests that fit a small CI machine's node (RealMemory is 80 % of the RAM); the demo's jobs
    # peak below 800 MB
    cpus = min(2, os.cpu_count() or 1)  # the node has as many CPUs as this machine
    for res in config["resources"].values():
        res["mem_mb"] = min(res["mem_mb"], 1500)
        res["threads"] = min(res["threads"], cpus)
    # the high-res job trains data-parallel: two CPU processes (gloo) started by drgn train --nproc 2
    config["highres"]["processes"] = 2
    cfg = write_config(tmp_path, config)
    slurm_env = {**env(), **slurm_cluster}
    cmd = ["timeout", "-s", "INT", "-k", "30", "1500",
           *snakemake_cmd(tmp_path, cfg, "--profile", str(PROFILE),
                          "--slurm-init-seconds-before-status-checks", "2",
                          "--seconds-between-status-checks", "3", "--latency-wait", "5")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=slurm_env, capture_output=True, text=True, timeout=1600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{output[-6000:]}\n{job_logs(tmp_path)}"

    summary = json.loads((tmp_path / "results" / "report" / "summary.json").read_text())
    assert summary["particles"]["input"] == config["simulate"]["n"]
    assert [r["run"] for r in summary["training"]] == ["pilot z1", "pilot z10", "high-res"]
    headline = summary["headline"]
    assert headline["junk filter F1"] >= 0.9, headline
    assert headline["|Spearman \u03c1|, highres/train"] >= 0.85, headline

    # every non-local rule ran as a SLURM job; training asked for a GPU in the gpu partition, others not
    ours = [j for j in _jobs(slurm_env).values() if j.get("WorkDir", "").rstrip("/") == str(tmp_path)]
    by_rule: dict[str, list[dict]] = {}
    for j in ours:  # the plugin puts "rule_<name>[_wildcards_<...>]" in each job's comment
        by_rule.setdefault(j.get("Comment", "").removeprefix("rule_").split("_wildcards_")[0], []).append(j)
    assert len(by_rule["train_pilot"]) == 2 and len(by_rule["downsample"]) == 2, by_rule.keys()
    assert TRAINING_RULES | {"simulate_particles", "filter_particles", "analyze_highres", "traverse_highres",
                             "backproject_kept", "evaluate_highres", "export_kept"} <= set(by_rule)
    assert not {"write_filter_spec", "summarize"} & set(by_rule)  # local rules run on the submit host
    for rule, jobs in by_rule.items():
        for j in jobs:
            assert j["JobState"] == "COMPLETED", j
            if rule in TRAINING_RULES:
                assert j["Partition"] == "gpu" and "gpu:1" in j.get("TresPerJob", ""), j
            else:
                assert j["Partition"] == "cpu" and "gpu" not in j.get("TresPerJob", ""), j
    # the high-res model was trained by two processes, which recorded it
    run_cfg = yaml.safe_load((tmp_path / "results" / "highres" / "train" / "config.yaml").read_text())
    assert run_cfg["distributed"]["world_size"] == 2 and run_cfg["distributed"]["backend"] == "gloo"
    # the jobs' own logs were kept (slurm-keep-successful-logs in the profile)
    assert any((tmp_path / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert os.environ.get("SLURM_CONF") != slurm_cluster["SLURM_CONF"]  # nothing leaked into this process
