"""The workflow on a real SLURM cluster: one node on localhost, the SLURM profile, jobs sent by sbatch.

The session fixture `default_workflow` (tests/conftest.py) brings the cluster up with scripts/slurm/up.sh
(Debian's slurm-wlm and munge, installed when missing; one node with a fake GPU), runs the default
workflow — config/config.yaml as shipped, with only the memory requests lowered to fit a small CI
machine's node, and the high-res training run as two data-parallel CPU processes (gloo,
highres.processes: 2) — with `--profile profiles/slurm` under `timeout -s INT`, and always shuts the
cluster down with scripts/slurm/down.sh, which stops exactly the daemons it started. This test checks that
training jobs went to the GPU partition with a GPU and the others did not, and that the high-res run
recorded two processes. The same run's accuracy (junk-filter F1, high-res |Spearman rho|) is asserted by
test_default_accuracy.py, which also runs where SLURM cannot be installed (the workflow then runs locally
and this test skips, saying why).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

TRAINING_RULES = {"train_pilot", "train_highres"}


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


def test_workflow_runs_on_slurm(default_workflow):
    if default_workflow["slurm_env"] is None:
        pytest.skip(default_workflow["why_local"])
    tmp_path, config = default_workflow["workdir"], default_workflow["config"]
    slurm_env = default_workflow["slurm_env"]
    summary = json.loads((tmp_path / "results" / "report" / "summary.json").read_text())
    assert summary["particles"]["input"] == config["simulate"]["n"]
    assert [r["run"] for r in summary["training"]] == ["pilot z1", "pilot z10", "high-res"]

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
    assert os.environ.get("SLURM_CONF") != slurm_env["SLURM_CONF"]  # nothing leaked into this process
