"""Import against the independent conventions fixture (tests/data/conventions, README checks 1 and 2).

The fixture was written by code independent of ours, from RELION's and cryoSPARC's definitions; agreeing
with its truth.npz pins our readers to the tools' meaning of every number.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers_io import FIXTURE, FIXTURE_TABLES

from drgn_core.cli import main
from drgn_core.importing import import_particles
from drgn_core.io.images import iter_image_chunks, read_images
from drgn_core.io.table import read_table


@pytest.fixture(scope="module")
def truth():
    return dict(np.load(FIXTURE / "truth.npz", allow_pickle=False))


@pytest.fixture(scope="module")
def tables():
    return {name: import_particles(FIXTURE / name) for name in FIXTURE_TABLES}


@pytest.mark.parametrize("name", FIXTURE_TABLES)
def test_fixture_table_matches_truth(name, tables, truth):
    t = tables[name]
    assert len(t) == 400 and t.box == 48 and t.apix == pytest.approx(3.0)
    np.testing.assert_allclose(t.poses(), truth["A"], atol=1e-5)
    np.testing.assert_allclose(t.shifts_A(), truth["origin_A"], atol=1e-3)
    ctf = t.ctf_params()
    # STAR files store defocus with 2 decimals, .cs files in float32: equal to that precision.
    np.testing.assert_allclose(ctf[:, 1], truth["defocus_u"], atol=0.01)
    np.testing.assert_allclose(ctf[:, 2], truth["defocus_v"], atol=0.01)
    np.testing.assert_allclose(ctf[:, 3], truth["defocus_angle_deg"], atol=1e-4)
    np.testing.assert_allclose(ctf[:, 7], truth["phase_shift_deg"], atol=1e-4)
    np.testing.assert_allclose(ctf[:, 4], truth["voltage_kv"], rtol=1e-6)
    np.testing.assert_allclose(ctf[:, 5], truth["cs_mm"], rtol=1e-6)
    np.testing.assert_allclose(ctf[:, 6], truth["amp_contrast"], rtol=1e-6)
    np.testing.assert_array_equal(t.particles["rlnOpticsGroup"].to_numpy(), truth["optics_group"])
    assert t.provenance["source_format"] == {"particles_relion31.star": "star31",
                                             "particles_relion30.star": "star30"}.get(name, "cs")
    assert t.provenance["source_path"] == str(FIXTURE / name)


@pytest.mark.parametrize("name", ["particles.cs", "particles_csdat.cs"])
def test_cs_uids_and_sign(name, tables, truth):
    t = tables[name]
    uids = t.uids()
    assert uids.dtype == np.uint64
    np.testing.assert_array_equal(uids, truth["uid"])
    assert (t.image_signs() == -1).all()
    assert t.particles["drgnStackIndex"].tolist() == list(range(400))


def test_images_via_cs_equal_images_via_star(tables):
    rows = np.array([399, 0, 200, 199, 17, 17, 250])
    via_cs = read_images(tables["particles.cs"], rows)
    for star in ("particles_relion31.star", "particles_relion30.star"):
        np.testing.assert_array_equal(read_images(tables[star], rows), via_cs)
    # And streamed in table order (crosses the part_a/part_b boundary inside a chunk).
    streamed = np.concatenate([x for _, x in iter_image_chunks(tables["particles_relion31.star"], 7)])
    np.testing.assert_array_equal(streamed, read_images(tables["particles_csdat.cs"], np.arange(400)))


def test_star_and_cs_import_identically(tables):
    a, b = tables["particles_relion31.star"], tables["particles.cs"]
    np.testing.assert_allclose(a.poses(), b.poses(), atol=1e-5)
    np.testing.assert_allclose(a.shifts_A(), b.shifts_A(), atol=1e-5)
    ca, cb = a.ctf_params(), b.ctf_params()
    np.testing.assert_allclose(ca[:, [1, 2]], cb[:, [1, 2]], rtol=1e-5)  # defocus (Å), relative
    # Angles: the STAR stores 4 decimals (degrees), so agreement is to that precision.
    np.testing.assert_allclose(ca[:, [3, 7]], cb[:, [3, 7]], atol=1e-4)
    np.testing.assert_allclose(ca[:, [0, 4, 5, 6, 8]], cb[:, [0, 4, 5, 6, 8]], rtol=1e-6)


def test_cli_import_writes_canonical_table(tmp_path, capsys, truth):
    out = tmp_path / "table.star"
    assert main(["import", str(FIXTURE / "particles_csdat.cs"), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "Imported 400 particles" in said and "box 48 px at 3 Å/px" in said and "2 optics groups" in said
    t = read_table(out)
    np.testing.assert_array_equal(t.uids(), truth["uid"])
    np.testing.assert_allclose(t.poses(), truth["A"], atol=1e-5)
    assert t.provenance["source_path"] == str(FIXTURE / "particles_csdat.cs")
    assert t.provenance["source_format"] == "cs"
    np.testing.assert_array_equal(read_images(t, np.arange(3)),
                                  -read_images(import_particles(FIXTURE / "particles.cs", invert=True),
                                               np.arange(3)))


def test_datadir_resolution(tmp_path, capsys):
    star = tmp_path / "moved.star"
    shutil.copy(FIXTURE / "particles_relion31.star", star)
    out = tmp_path / "t.star"
    assert main(["import", str(star), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stack stacks/part_a.mrcs not found" in err and "--datadir" in err and not out.exists()
    # datadir/path …
    assert main(["import", str(star), "-o", str(out), "--datadir", str(FIXTURE)]) == 0
    assert read_table(out).stack_paths()[0] == str(FIXTURE / "stacks" / "part_a.mrcs")
    # … and datadir/basename (a flat folder of stacks).
    assert main(["import", str(star), "-o", str(out), "--datadir", str(FIXTURE / "stacks")]) == 0
    assert read_table(out).stack_paths()[-1] == str(FIXTURE / "stacks" / "part_b.mrcs")


def test_check_nan_and_box_pass_on_clean_fixture(tmp_path):
    out = tmp_path / "t.star"
    assert main(["import", str(FIXTURE / "particles.cs"), "-o", str(out), "--check-nan", "--box", "48"]) == 0
    assert out.exists()


def test_cs_datadir_is_the_project_folder(tmp_path, capsys):
    cs = tmp_path / "J9" / "J9_particles.cs"
    cs.parent.mkdir()
    shutil.copy(FIXTURE / "particles.cs", cs)
    assert main(["import", str(cs), "-o", str(tmp_path / "t.star")]) == 2
    assert "stack stacks/dark.mrcs not found (400 rows, first row 0" in capsys.readouterr().err
    assert main(["import", str(cs), "-o", str(tmp_path / "t.star"), "--datadir", str(FIXTURE)]) == 0
    assert read_table(tmp_path / "t.star").stack_paths()[0] == str(FIXTURE / "stacks" / "dark.mrcs")


def test_reimporting_a_canonical_table_keeps_locations_and_sign(tmp_path, tables):
    """A canonical table's rlnImageName is relative to the original file's folder; its own columns win."""
    out = tmp_path / "elsewhere" / "table.star"
    assert main(["import", str(FIXTURE / "particles.cs"), "-o", str(out)]) == 0
    again = import_particles(out)
    assert (again.image_signs() == -1).all()
    rows = np.array([3, 399, 0])
    bright = read_images(tables["particles_relion31.star"], rows)
    np.testing.assert_array_equal(read_images(again, rows), bright)
    np.testing.assert_array_equal(again.uids(), tables["particles.cs"].uids())
