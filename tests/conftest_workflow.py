"""Helpers shared by the workflow tests (test_workflow.py) and the SLURM integration test (test_slurm.py).

They run the real Snakefile with the project's own Snakemake, in a scratch working directory, on a
configuration small enough for CI: a few hundred simulated particles at D = 32 and a few epochs. Only the
keys that differ from the schema's defaults are written, so these runs also check that the defaults
alone make a complete workflow (inside cluster jobs too).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
CONVENTIONS = REPO / "tests" / "data" / "conventions"  # the independent fixture (its README)
BIN = Path(sys.executable).parent  # the venv holding snakemake and the `drgn` command

#: A whole-workflow run in about two minutes on 2 cores: what the re-run tests and the SLURM test use.
TINY_CONFIG: dict = {
    "simulate": {"n": 400, "D": 32, "snr": 0.5, "junk_fraction": 0.15, "seed": 0},
    "pilot": {"D": 16, "zdims": [1, 10], "train": {"epochs": 3, "enc_dim": 64, "dec_dim": 64,
                                                   "batch_size": 32}},
    "filter": {"pilots": [
        {"zdim": 1, "filters": [{"norm": {"k_std": 2.0}}]},
        {"zdim": 10, "filters": [{"gmm": {"components": 3, "remove": {"rule": "largest_mean_norm"}}}]},
    ]},
    "highres": {"D": 32, "train": {"epochs": 3, "enc_dim": 64, "dec_dim": 64, "batch_size": 32}},
    "analyze": {"ksample": 4, "pc": 1},
    "traverse": {"kmeans": 3, "max_volumes": 3},
    "landscape": {"maps": 30, "states": 3, "pcs": 5},
    "validate": {"n_fsc": 4},
    "resources": {"highres": {"threads": 2}, "analyze": {"threads": 2}},
}


def write_config(workdir: Path, config: dict, name: str = "config.yaml") -> Path:
    """Write a workflow config into `workdir` and return its path."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def env() -> dict[str, str]:
    """The environment of a workflow run: our venv first on PATH (jobs call `drgn`), headless plots."""
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["MPLBACKEND"] = "Agg"
    e.setdefault("NUMBA_CACHE_DIR", str(Path("/tmp") / "drgnflow-numba-cache"))
    return e


def snakemake_cmd(workdir: Path, configfile: Path | None, *args: str) -> list[str]:
    """`snakemake` on the repository's Snakefile, run in `workdir` (outputs stay out of the repository)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir)]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    return cmd + list(args)


def run_snakemake(workdir: Path, configfile: Path | None, *args: str, timeout: float = 900,
                  check: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake; with check=True a failure raises with the tail of its output and of the job logs.

    `timeout -s INT` stops an overdue run the way a user's Ctrl-C would: Snakemake then stops its jobs
    (a SIGKILL would leave them running).
    """
    cmd = ["timeout", "-s", "INT", "-k", "30", str(int(timeout)), *snakemake_cmd(workdir, configfile, *args)]
    proc = subprocess.run(cmd, cwd=workdir, env=env(), capture_output=True, text=True, timeout=timeout + 60)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{(proc.stdout + proc.stderr)[-6000:]}\n{job_logs(workdir)}")
    return proc


def job_logs(workdir: Path, tail: int = 1500) -> str:
    """The end of every job log under workdir/results/logs (for failure messages)."""
    out = []
    logs = workdir / "results" / "logs"
    for log in sorted(logs.rglob("*.log")) if logs.is_dir() else []:
        out.append(f"--- {log.relative_to(workdir)}\n{log.read_text(errors='replace')[-tail:]}")
    return "\n".join(out)


def planned_jobs(output: str) -> dict[str, int]:
    """Rule name -> job count from the "Job stats" table Snakemake prints (empty when nothing is to do)."""
    jobs: dict[str, int] = {}
    m = re.search(r"Job stats:\n(.*?)\n\s*\n", output + "\n\n", re.S)
    if not m:
        return jobs
    for line in m.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("job", "total"):
            jobs[parts[0]] = int(parts[1])
    return jobs


def dry_run(workdir: Path, configfile: Path | None, *args: str) -> tuple[dict[str, int], str]:
    """Dry-run; returns the planned jobs and the full output (shell commands included)."""
    proc = run_snakemake(workdir, configfile, "-n", "-p", "--cores", "2", *args, timeout=120)
    out = proc.stdout + proc.stderr
    return planned_jobs(out), out


# ---- the default workflow, run once per test session -----------------------------------------------------
SLURM_UP = REPO / "scripts" / "slurm" / "up.sh"
SLURM_DOWN = REPO / "scripts" / "slurm" / "down.sh"
SLURM_PROFILE = REPO / "profiles" / "slurm"


def default_config() -> dict:
    """config/config.yaml as shipped, with only the resource requests lowered to fit a 2-core CI machine
    (a one-node SLURM cluster's RealMemory is 80 % of the RAM; the demo's jobs peak below 800 MB)."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cpus = min(2, os.cpu_count() or 1)
    for res in config["resources"].values():
        res["mem_mb"] = min(res["mem_mb"], 1500)
        res["threads"] = min(res["threads"], cpus)
    return config


def run_default_workflow(workdir: Path, slurm_env: dict[str, str] | None) -> dict:
    """Run the default workflow in `workdir`, on SLURM (`--profile profiles/slurm`) when `slurm_env` is given,
    else on this machine; raise with the output's tail and the job logs if it fails. → what ran, where."""
    config = default_config()
    if slurm_env is not None:
        # through the profile, the high-res job trains data-parallel: two CPU processes (gloo) started by
        # drgn train --nproc 2 (test_slurm.py checks the run recorded it)
        config["highres"]["processes"] = 2
    cfg = write_config(workdir, config)
    if slurm_env is None:
        run_snakemake(workdir, cfg, "--cores", str(min(2, os.cpu_count() or 1)), timeout=1800)
    else:
        cmd = ["timeout", "-s", "INT", "-k", "30", "1500",
               *snakemake_cmd(workdir, cfg, "--profile", str(SLURM_PROFILE),
                              "--slurm-init-seconds-before-status-checks", "2",
                              "--seconds-between-status-checks", "3", "--latency-wait", "5")]
        proc = subprocess.run(cmd, cwd=workdir, env={**env(), **slurm_env}, capture_output=True, text=True,
                              timeout=1600)
        assert proc.returncode == 0, f"{(proc.stdout + proc.stderr)[-6000:]}\n{job_logs(workdir)}"
    return {"workdir": workdir, "config": yaml.safe_load(cfg.read_text()), "slurm_env": slurm_env}
