"""Export when the poses came from a second file (issue 22): a STAR without poses (RELION 3.0, as
EMPIAR-10076's Parameters.star) imported with the poses of a cryoSPARC .cs exports, beside the row subset of
the STAR, the row subset of the poses .cs with its uids (+ .csg), and a RELION STAR that carries the poses
and CTF the run used; that STAR re-imports to the same poses and CTF."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_empiar_mode import _relion30

from drgn_core.cli import main
from drgn_core.io.table import read_table


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("poses_export")
    sim = root / "sim"
    assert main(["simulate", "-o", str(sim), "--n", "120", "-D", "32", "--seed", "5", "--quiet"]) == 0
    data = root / "data"
    data.mkdir()
    shutil.copy(sim / "particles.mrcs", data / "L17_stack.mrc")
    _relion30(sim, data / "Parameters.star", "L17_stack.mrc")
    # Rows are matched by order (the STAR has no uids); each row keeps the uid of its row in the .cs.
    shutil.copy(sim / "particles.cs", root / "consensus.cs")
    assert main(["import", str(data / "Parameters.star"), "--poses", str(root / "consensus.cs"), "-o",
                 str(root / "table.star")]) == 0
    return root, sim


def test_export_writes_poses_cs_with_uids_and_a_relion_star_with_poses(imported, tmp_path):
    from cryosparc.dataset import Dataset

    root, sim = imported
    table = read_table(root / "table.star")
    kept = np.arange(0, 120, 3)[::-1].copy()  # any order: exports follow the files' order
    np.save(tmp_path / "kept.npy", kept)
    out = tmp_path / "export"
    assert main(["export", str(root / "table.star"), "--ind", str(tmp_path / "kept.npy"), "-o", str(out),
                 "--source", str(root / "data" / "Parameters.star"), "--name", "kept"]) == 0
    poses = Dataset.load(root / "consensus.cs")
    sub = Dataset.load(out / "kept.poses.cs")
    want = np.sort(kept)
    np.testing.assert_array_equal(np.asarray(sub["uid"], dtype=np.uint64),
                                  np.asarray(poses["uid"], dtype=np.uint64)[want])
    assert set(sub.fields()) == set(poses.fields())
    np.testing.assert_array_equal(sub["alignments3D/pose"], np.asarray(poses["alignments3D/pose"])[want])
    csg = (out / "kept.poses.csg").read_text()
    assert "kept.poses.cs" in csg and f"num_items: {len(kept)}" in csg
    assert (out / "uids.txt").read_text().split() == [str(int(u)) for u in sub["uid"]]
    assert (out / "kept.star").exists()  # the identity-preserving subset of the original STAR, as before
    summary = json.loads((out / "export.json").read_text())
    assert summary["poses_source"] == str(root / "consensus.cs")

    # The RELION STAR carries the poses and CTF the run used: re-imported, they are the table's.
    again = tmp_path / "again.star"
    assert main(["import", str(out / "kept.relion.star"), "--datadir", str(root / "data"), "-o",
                 str(again)]) == 0
    back, ref = read_table(again), table.subset(want)
    np.testing.assert_allclose(back.poses(), ref.poses(), atol=1e-4)
    np.testing.assert_allclose(back.shifts_A(), ref.shifts_A(), atol=1e-5)
    np.testing.assert_allclose(back.ctf_params(), ref.ctf_params(), rtol=1e-6)
    np.testing.assert_allclose(back.poses(), read_table(sim / "table.star").subset(want).poses(), atol=1e-4)
    assert "data_optics" in (out / "kept.relion.star").read_text()


def test_export_with_source_the_poses_cs(imported, tmp_path, capsys):
    """What the issue's user tried: `drgn export --source <the poses .cs>` now gives its row subset."""
    from cryosparc.dataset import Dataset

    root, _ = imported
    np.save(tmp_path / "kept.npy", np.arange(10, 50))
    out = tmp_path / "export"
    assert main(["export", str(root / "table.star"), "--ind", str(tmp_path / "kept.npy"), "-o", str(out),
                 "--source", str(root / "consensus.cs")]) == 0
    uids = np.asarray(Dataset.load(root / "consensus.cs")["uid"], dtype=np.uint64)
    np.testing.assert_array_equal(np.asarray(Dataset.load(out / "kept.cs")["uid"], dtype=np.uint64),
                                  uids[10:50])
