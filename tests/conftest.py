"""Shared test settings: a headless plotting backend, a small thread count, the conventions fixture, and the
default workflow run (one per session, shared by the accuracy test and the SLURM test)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
CONVENTIONS = ROOT / "tests" / "data" / "conventions"


@pytest.fixture(scope="session")
def conventions_dir() -> Path:
    """The independent conventions fixture, shipped in tests/data/conventions (see its README)."""
    return CONVENTIONS


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def default_workflow(tmp_path_factory):
    """The shipped default workflow (config/config.yaml), run once per session and shared.

    Where a one-node SLURM cluster can be brought up (scripts/slurm/up.sh; CI), the workflow runs on it
    and test_slurm.py checks where its jobs went; elsewhere (a contributor's machine) it runs locally. Either
    way test_default_accuracy.py asserts the accuracy the README promises, so that check never skips and
    CI still runs the default workflow (several minutes) only once. DRGNFLOW_NO_SLURM=1 skips the SLURM
    attempt (e.g. where installing slurm-wlm is unwanted). The cluster's daemons are stopped afterwards,
    pass or fail. Yields {"workdir", "config", "slurm_env" (None when it ran locally), "why_local"}.
    """
    from conftest_workflow import SLURM_DOWN, SLURM_UP, run_default_workflow

    state = tmp_path_factory.mktemp("slurm")
    workdir = tmp_path_factory.mktemp("default_workflow")
    slurm_env, why_local, up = None, "", False
    try:
        if os.environ.get("DRGNFLOW_NO_SLURM"):
            why_local = "DRGNFLOW_NO_SLURM is set: the default workflow ran locally"
        elif shutil.which("bash") is None:
            why_local = "bash is needed to bring up the SLURM cluster"
        else:
            proc = subprocess.run(["bash", str(SLURM_UP), str(state)], capture_output=True, text=True,
                                  timeout=900)
            up = True
            if proc.returncode == 3:
                why_local = f"SLURM cannot be installed here: {proc.stderr.strip().splitlines()[-1]}"
            else:
                assert proc.returncode == 0, f"up.sh failed ({proc.returncode}):\n{proc.stderr}"
                assert re.search(r"export SLURM_CONF=\S+", proc.stdout), proc.stdout
                slurm_env = {"SLURM_CONF": str(state / "slurm.conf")}
        yield {**run_default_workflow(workdir, slurm_env), "why_local": why_local}
    finally:
        if up:
            subprocess.run(["bash", str(SLURM_DOWN), str(state)], capture_output=True, text=True, timeout=120)
            assert not (state / "pids").exists()


@pytest.fixture
def one_torch_thread():
    """Small tensors: one torch thread is faster than two, and leaves the other core to the rest of the
    suite. Test modules that train or decode small models use it for every test (pytestmark)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
