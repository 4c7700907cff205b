"""drgnflow installs like any other package: `python -m build` makes an sdist and a wheel, and the wheel,
installed into a fresh virtual environment, runs `drgn --help`, `drgn check-config` and `drgn simulate`
from a folder that is not the checkout.

Why: an editable checkout hides files the package reads from outside itself (the config schema once lived
in config/schema/ and an installed `drgn check-config` could not find it). Building from a copy of the
sources and running from elsewhere, with PYTHONPATH cleared, means only what the wheel holds is imported.

The fresh environment gets the wheel alone (`--no-deps`); its dependencies (torch, numpy, ...) come from
this test's own environment through a .pth line, so the test needs no network and stays well under a
minute. That line adds the folder to sys.path without running the .pth files in it, so an editable
install of drgnflow there is not seen: the test checks that drgn_core is imported from the fresh venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from drgn_core import __version__
from drgn_core.io.table import read_table

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "drgn_core/config.schema.yaml"
# what a source copy leaves out: environments, run outputs, caches and earlier builds
SKIP = shutil.ignore_patterns(".git", ".venv", "results", ".snakemake", "__pycache__", "*.egg-info",
                              "build", "dist", ".pytest_cache", ".ruff_cache")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="venv layout below is POSIX")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """An sdist and a wheel built by `python -m build` from a copy of the checkout."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=SKIP, symlinks=True)
    out = root / "dist"
    # --no-isolation: build with this environment's setuptools rather than downloading one
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], cwd=root)
    return out


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel, with this environment's site-packages for its dependencies."""
    root = tmp_path_factory.mktemp("venv")
    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=root)
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=root).stdout.strip())
    (site / "_drgnflow_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    wheel = next(dist.glob("*.whl"))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "-q", str(wheel)], cwd=root)
    return env_dir


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"
    env["MPLBACKEND"] = "Agg"
    return env


def test_build_makes_an_sdist_and_a_wheel_with_the_schema(dist):
    sdists = list(dist.glob("drgnflow-*.tar.gz"))
    wheels = list(dist.glob("drgnflow-*.whl"))
    assert [p.name for p in sdists] == [f"drgnflow-{__version__}.tar.gz"]
    assert [p.name for p in wheels] == [f"drgnflow-{__version__}-py3-none-any.whl"]
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        entry_points = whl.read(f"drgnflow-{__version__}.dist-info/entry_points.txt").decode()
    assert SCHEMA in names and "drgn_core/cli.py" in names and "drgn_core/io/table.py" in names
    assert not any(n.startswith(("tests/", "workflow/", "config/")) for n in names)
    assert "drgn = drgn_core.cli:main" in entry_points
    with tarfile.open(sdists[0]) as sdist:
        assert f"drgnflow-{__version__}/{SCHEMA}" in sdist.getnames()
    # the shipped schema is the one the workflow validates against: one copy, not two
    assert not (REPO / "config" / "schema").exists()


def test_installed_wheel_runs_help_check_config_and_simulate(venv, tmp_path):
    env = _env(venv)
    where = _run([str(venv / "bin" / "python"), "-c", "import drgn_core; print(drgn_core.__file__)"],
                 cwd=tmp_path, env=env).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's copy, not the checkout
    drgn = str(venv / "bin" / "drgn")
    assert "check-config" in _run([drgn, "--help"], cwd=tmp_path, env=env).stdout
    assert _run([drgn, "--version"], cwd=tmp_path, env=env).stdout.strip().endswith(__version__)

    # the demo config, copied away from the checkout: the schema must come from the installed package
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config.yaml")
    out = _run([drgn, "check-config", "config.yaml"], cwd=tmp_path, env=env).stdout
    assert out.startswith("config.yaml: valid (simulated; pilots zdim 1, 10 at D=32")
    (tmp_path / "bad.yaml").write_text("pilot:\n  epoch: 3\n")
    bad = subprocess.run([drgn, "check-config", "bad.yaml"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert "key 'pilot': unknown key 'epoch' (allowed: D, train, val_frac, zdims)" in bad.stderr
    (tmp_path / "short.yaml").write_text("results: out\n")
    full = yaml.safe_load(_run([drgn, "check-config", "short.yaml", "--print-defaults"],
                               cwd=tmp_path, env=env).stdout)
    assert full["results"] == "out" and full["highres"]["train"]["enc_dim"] == 256  # schema defaults

    _run([drgn, "simulate", "-o", "sim", "--n", "40", "-D", "32", "--n-gt", "5", "--junk-fraction", "0.25",
          "--seed", "0", "--quiet"], cwd=tmp_path, env=env)
    sim = tmp_path / "sim"
    assert {p.name for p in sim.iterdir()} >= {"table.star", "particles.mrcs", "particles.star",
                                               "particles.cs", "gt.json", "gt_volumes"}
    # what the installed command wrote reads back here: 40 rows at 32 px, exactly round(0.25 * 40) junk
    t = read_table(sim / "table.star")
    assert len(t) == 40 and t.box == 32 and int((t.gt("drgnGtJunk") == 1).sum()) == 10
