"""The workflow's `empiar` input mode: the shipped EMPIAR configs, its config checks, and one run end to end
against the loopback EMPIAR server (tests/empiar_server.py) compared with the same data in `star` mode."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import starfile
from conftest_workflow import REPO, TINY_CONFIG, dry_run, env, run_snakemake, write_config
from empiar_server import FakeEmpiar, api_body

from drgn_core.cli import main
from drgn_core.config_check import validate_config
from drgn_core.errors import DrgnError
from drgn_core.io.table import read_table

EXAMPLES = ["empiar10028", "empiar10049", "empiar10076", "empiar10180"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_paper_configs_check_and_dry_run_offline(name, tmp_path, capsys):
    """Each paper config is valid and plans the whole DAG, starting with the fetch, without the network:
    the dry run runs in a network namespace of its own (no interface but a down loopback)."""
    path = REPO / "config" / "examples" / f"{name}.yaml"
    assert main(["check-config", str(path)]) == 0
    accession = f"EMPIAR-{name[6:]}"
    assert capsys.readouterr().out.startswith(f"{path}: valid (empiar {accession}; pilots zdim")
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        pytest.skip("cannot make a network namespace here")
    proc = subprocess.run(["unshare", "-n", *_snakemake(tmp_path, path, "-n", "-p", "--cores", "2")],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "fetch_empiar             1" in out and "import_particles         1" in out
    assert f"drgn fetch {accession} -o data/{name} " in out
    assert f"--stacks-of data/{name}/" in out  # the stacks follow from the particle file
    assert not (tmp_path / "data").exists()


def _snakemake(workdir: Path, config: Path, *args: str) -> list[str]:
    from conftest_workflow import snakemake_cmd

    return snakemake_cmd(workdir, config, *args)


def _problems(cfg: dict) -> str:
    with pytest.raises(DrgnError) as e:
        validate_config(cfg, check_files=False)
    return str(e.value)


def test_empiar_config_problems_are_named():
    base = {"input": {"mode": "empiar"}}
    assert "key 'empiar.accession': input.mode empiar needs an accession" in _problems(base)
    msg = _problems({"input": {"mode": "empiar", "path": "x.star"}, "empiar": {
        "accession": "EMPIAR-10076", "include": ["data/P.star"], "particles": {"file": "data/Q.star"},
        "poses": {"url": "https://example.org/p.cs", "checksum": "md5:00"}}})
    assert ("key 'input.path': must be empty with input.mode empiar (found 'x.star'); use "
            "empiar.particles") in msg
    assert "key 'empiar.particles.file': data/Q.star is not among the files empiar.include fetches" in msg
    assert ("key 'empiar.poses.checksum': a URL needs sha256:<64 hex> or git:<40 hex> (a git blob id), found "
            "'md5:00'") in msg
    assert "key 'empiar.accession': set, but input.mode is simulate" in _problems(
        {"empiar": {"accession": "EMPIAR-10076"}})


# ---- end to end ---------------------------------------------------------------------------------------

def _relion30(sim: Path, star_out: Path, stack_name: str) -> None:
    """The simulator's particles as a RELION 3.0 STAR without poses: CTF per particle, pixel size only as
    magnification × detector pixel (6 µm at 20,000× = 3.0 Å), as EMPIAR-10076's Parameters.star."""
    blocks = starfile.read(sim / "particles.star", always_dict=True)
    p, optics = blocks["particles"], blocks["optics"].iloc[0]
    n = len(p)
    df = {
        "rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(n)],
        "rlnDefocusU": p["rlnDefocusU"], "rlnDefocusV": p["rlnDefocusV"],
        "rlnDefocusAngle": p["rlnDefocusAngle"], "rlnCtfBfactor": p["rlnCtfBfactor"],
        "rlnVoltage": np.full(n, optics["rlnVoltage"]),
        "rlnSphericalAberration": np.full(n, optics["rlnSphericalAberration"]),
        "rlnAmplitudeContrast": np.full(n, optics["rlnAmplitudeContrast"]),
        "rlnMagnification": np.full(n, 20000.0), "rlnDetectorPixelSize": np.full(n, 6.0),
    }
    import pandas as pd

    assert float(optics["rlnImagePixelSize"]) == 3.0
    starfile.write({"": pd.DataFrame(df)}, star_out, overwrite=True)


def _tiny() -> dict:
    """TINY_CONFIG with one pilot and two epochs a run: each run trains twice."""
    tiny = copy.deepcopy(TINY_CONFIG)
    del tiny["simulate"]
    tiny["pilot"].update(zdims=[10], train={**tiny["pilot"]["train"], "epochs": 2})
    tiny["filter"]["pilots"] = tiny["filter"]["pilots"][1:]
    tiny["highres"]["train"]["epochs"] = 2
    tiny["validate"] = {"n_fsc": 4, "ground_truth": False}
    return tiny


def empiar_config(srv: FakeEmpiar, sha: str) -> dict:
    """The empiar-mode config of the end-to-end run, for a server `srv` serving the entry."""
    return {**_tiny(), "input": {"mode": "empiar"}, "empiar": {
        "accession": "EMPIAR-10999", "include": ["data/Parameters.star", "data/L17*"],
        "particles": {"file": "data/Parameters.star"},
        "poses": {"url": f"{srv.data_base}/inputs/consensus.cs", "checksum": f"sha256:{sha}"},
        "datadir": "data", "folder": "fetched", "connections": 4,
        "api_base": srv.api_base, "data_base": srv.data_base}}


@pytest.fixture(scope="module")
def empiar_run(tmp_path_factory):
    """One uninterrupted empiar-mode run of the README's command on the loopback server, whose listing
    leaves out the particle file once and the stack it names once: the one command completes anyway.
    Returns (root, sim folder, served entry folder, poses sha256)."""
    root = tmp_path_factory.mktemp("empiar")
    sim = root / "sim"
    subprocess.run(["drgn", "simulate", "-o", str(sim), "--n", "400", "-D", "32", "--snr", "0.5",
                    "--junk-fraction", "0.15", "--seed", "0"], env=env(), check=True, capture_output=True)
    # The entry as EMPIAR lays it out: a RELION 3.0 STAR and a stack with a .mrc name; the poses are a
    # cryoSPARC .cs published elsewhere (served here under inputs/, fetched by URL with its sha256).
    entry = root / "srv" / "10999" / "data"
    entry.mkdir(parents=True)
    shutil.copy(sim / "particles.mrcs", entry / "L17_stack.mrc")
    _relion30(sim, entry / "Parameters.star", "L17_stack.mrc")
    (root / "srv" / "inputs").mkdir()
    shutil.copy(sim / "particles.cs", root / "srv" / "inputs" / "consensus.cs")
    (entry / "unrelated_map.mrc").write_bytes(b"\0" * 2048)  # in the entry, not in the include globs
    sha = hashlib.sha256((sim / "particles.cs").read_bytes()).hexdigest()
    with FakeEmpiar(root / "srv", {"EMPIAR-10999": api_body("10999")}, lifetime=900) as srv:
        srv.omit_once.add("10999/data/Parameters.star")  # the listing forgets it once: found anyway
        srv.omit_once.add("10999/data/L17_stack.mrc")  # ... and the stack: fetched as the STAR names it
        emp = write_config(root / "emp", empiar_config(srv, sha))
        run_snakemake(root / "emp", emp, "--profile", str(REPO / "profiles" / "local"), "--cores", "2",
                      timeout=900)
        fetched = root / "emp" / "fetched"
        assert (fetched / "data" / "L17_stack.mrc").read_bytes() == (sim / "particles.mrcs").read_bytes()
        assert not (fetched / "data" / "unrelated_map.mrc").exists()
        # A finished run has nothing left to do, and the fetch is not repeated.
        sent = srv.bytes_sent
        assert dry_run(root / "emp", emp)[0] == {}
        assert srv.bytes_sent == sent
    return root, sim, entry, sha


@pytest.mark.slow
def test_empiar_mode_end_to_end_equals_star_mode(empiar_run):
    root, sim, entry, _ = empiar_run
    # The same files, local, in star mode.
    local = root / "star" / "local"
    local.mkdir(parents=True)
    for f in ("Parameters.star", "L17_stack.mrc"):
        shutil.copy(entry / f, local / f)
    shutil.copy(sim / "particles.cs", local / "consensus.cs")
    star = write_config(root / "star", {**_tiny(), "input": {
        "mode": "star", "path": "local/Parameters.star", "poses": "local/consensus.cs"}})
    run_snakemake(root / "star", star, "--cores", "2", timeout=900)

    a, b = root / "emp" / "results", root / "star" / "results"
    # The imported table is the simulator's truth: same poses, shifts and CTF, row for row.
    truth, got = read_table(sim / "table.star"), read_table(a / "data" / "table.star")
    assert got.apix == 3.0 and got.box == 32 and got.n == truth.n == 400
    np.testing.assert_allclose(got.poses(), truth.poses(), atol=1e-5)
    np.testing.assert_allclose(got.shifts_A(), truth.shifts_A(), atol=1e-5)
    np.testing.assert_allclose(got.ctf_params(), truth.ctf_params(), rtol=1e-6)
    assert (a / "data" / "particles.32.mrcs").read_bytes() == (b / "data" / "particles.32.mrcs").read_bytes()
    assert np.array_equal(np.load(a / "filter" / "kept.npy"), np.load(b / "filter" / "kept.npy"))
    metrics = []
    for run in (a, b):
        out = root / f"gt_metrics_{run.parent.name}.json"  # outside results/: the kill test compares that
        subprocess.run(["drgn", "evaluate", str(run / "highres" / "train"), "--table",
                        str(sim / "table.star"), "--gt-dir", str(sim / "gt_volumes"), "--filter-dir",
                        str(run / "filter"), "--n-fsc", "4", "-o", str(out)],
                       env=env(), check=True, capture_output=True)
        metrics.append(json.loads(out.read_text()))
    for m in metrics:  # the paths differ, nothing else may
        del m["run"], m["filter"]["dir"]
    assert metrics[0] == metrics[1]
    assert metrics[0]["filter"]["true_junk"] == 60 and metrics[0]["per_image_fsc"]["n_images"] == 4


@pytest.mark.slow
def test_empiar_mode_exports_the_poses_cs_with_the_kept_uids(empiar_run):
    """The poses came from a .cs: the export rule wrote its subset (cryosparc-tools loads it, with the uids
    of exactly the kept particles) and a RELION STAR that re-imports to the same poses."""
    from cryosparc.dataset import Dataset

    root, _, entry, _ = empiar_run
    res = root / "emp" / "results"
    kept = np.load(res / "filter" / "kept.npy")
    table = read_table(res / "data" / "table.star")
    exported = sorted((res / "export").glob("*.poses.cs"))
    assert len(exported) == 1
    sub = Dataset.load(exported[0])
    all_uids = np.asarray(Dataset.load(root / "srv" / "inputs" / "consensus.cs")["uid"], dtype=np.uint64)
    np.testing.assert_array_equal(np.sort(np.asarray(sub["uid"], dtype=np.uint64)),
                                  np.sort(all_uids[table.poses_rows()[kept]]))
    assert exported[0].with_suffix(".csg").exists()
    relion = exported[0].with_name(exported[0].name.replace(".poses.cs", ".relion.star"))
    again = root / "reimported.star"
    assert main(["import", str(relion), "--datadir", str(entry), "-o", str(again)]) == 0
    back = read_table(again)
    np.testing.assert_allclose(back.poses(), table.subset(np.sort(kept)).poses(), atol=1e-4)


KILL_STAGES = ["fetch", "import", "downsample", "pilot", "filter", "highres", "analyze", "export"]
EXACT = {".npy", ".star", ".cs", ".csg", ".mrcs", ".txt"}  # byte for byte; maps (.mrc) to fp32 tolerance


def _without_created(path: Path) -> bytes:
    """A file's bytes; for a cryoSPARC .csg, less its `created:` line (when the export ran, by design)."""
    raw = path.read_bytes()
    if path.suffix == ".csg":
        raw = b"".join(ln for ln in raw.splitlines(keepends=True) if not ln.startswith(b"created:"))
    return raw


@pytest.mark.slow
def test_workflow_killed_at_any_moment_ends_the_same(empiar_run):
    """SIGKILL Snakemake and its jobs (the process group) once in each stage, at a seeded moment after the
    stage's first job starts, rerunning the README's command each time; the last rerun completes, and every
    output equals the uninterrupted run's (the fixture's), in the same folder (paths are recorded).
    Runs last: it moves the fixture's results aside."""
    import os
    import signal
    import time

    from conftest_workflow import snakemake_cmd

    root, _, _, sha = empiar_run
    work = root / "emp"
    ref = root / "reference"
    shutil.move(work / "results", ref)
    for d in ("fetched", ".snakemake"):
        shutil.rmtree(work / d, ignore_errors=True)
    rng = np.random.default_rng(22)
    profile = ["--profile", str(REPO / "profiles" / "local"), "--cores", "2"]
    killed = []
    with FakeEmpiar(root / "srv", {"EMPIAR-10999": api_body("10999")}, lifetime=1800) as srv:
        cfg = write_config(work, empiar_config(srv, sha))
        for stage in KILL_STAGES:
            t0 = time.time()
            proc = subprocess.Popen(snakemake_cmd(work, cfg, *profile), cwd=work, env=env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            logs = work / "results" / "logs" / stage
            while proc.poll() is None and time.time() - t0 < 600:
                if logs.is_dir() and any(p.stat().st_mtime >= t0 for p in logs.glob("*.log")):
                    break
                time.sleep(0.05)
            if proc.poll() is None:
                time.sleep(rng.uniform(0.1, 1.5))
                os.killpg(proc.pid, signal.SIGKILL)
            killed.append((stage, proc.wait()))
        run_snakemake(work, cfg, *profile, timeout=900)
    assert sum(rc == -signal.SIGKILL for _, rc in killed) >= 8, killed
    differ, compared = [], 0
    for a in sorted(ref.rglob("*")):
        rel = a.relative_to(ref)
        if not a.is_file() or rel.parts[0] in ("logs", "benchmarks"):
            continue
        b = work / "results" / rel
        assert b.exists(), rel
        if a.suffix == ".mrc":
            import mrcfile

            with mrcfile.open(a, permissive=True) as x, mrcfile.open(b, permissive=True) as y:
                if not np.allclose(x.data, y.data, rtol=1e-5, atol=1e-6 * float(np.abs(x.data).max())):
                    differ.append(str(rel))
            compared += 1
        elif a.suffix in EXACT:
            if _without_created(a) != _without_created(b):
                differ.append(str(rel))
            compared += 1
    assert compared > 20 and differ == [], (killed, differ)
