"""`drgn export`: row subsets of the user's own STAR / .cs that import back to the same particles, the
.csg group file, uid list, index files, the ChimeraX script, and the errors users meet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from drgn_core.cli import main
from drgn_core.export import chimerax_series_script
from drgn_core.importing import import_particles
from drgn_core.io.indices import read_index_file
from drgn_core.io.mrc import write_mrc
from drgn_core.io.table import read_table, write_table

FIXTURE = Path(__file__).resolve().parent / "data" / "conventions"

SOURCES = ["particles_relion31.star", "particles_relion30.star", "particles.cs", "particles_csdat.cs"]


@pytest.fixture
def data(tmp_path) -> Path:
    """A writable copy of the fixture's particle files and their stacks/ folder."""
    d = tmp_path / "data"
    d.mkdir()
    for name in SOURCES:
        shutil.copy(FIXTURE / name, d / name)
    shutil.copytree(FIXTURE / "stacks", d / "stacks")
    return d


def imported(data: Path, source: str, tmp_path: Path) -> Path:
    """Import a fixture file → canonical table path (its provenance names the source), as drgn import."""
    table = tmp_path / f"table_{Path(source).stem}.star"
    write_table(import_particles(data / source), table)
    return table


def selection(n: int = 400, k: int = 57, seed: int = 0) -> np.ndarray:
    """k distinct rows in a shuffled order (export must not depend on the order given)."""
    return np.random.default_rng(seed).choice(n, size=k, replace=False)


def same_particles(a, b) -> None:
    """Two tables describe the same particles: poses, shifts, CTF, images (to the table's 6 decimals)."""
    np.testing.assert_allclose(a.poses(), b.poses(), atol=1e-6)
    np.testing.assert_allclose(a.shifts_A(), b.shifts_A(), atol=1e-5)
    np.testing.assert_allclose(a.ctf_params(), b.ctf_params(), rtol=1e-7, atol=1e-5)
    np.testing.assert_array_equal(a.stack_paths(), b.stack_paths())
    np.testing.assert_array_equal(a.stack_indices(), b.stack_indices())
    np.testing.assert_array_equal(a.image_signs(), b.image_signs())


def star_loop_rows(path: Path) -> tuple[list[str], list[str]]:
    """(labels, data lines) of the loop holding _rlnImageName, read naively for the tests."""
    lines = path.read_text().splitlines()
    labels, rows, in_loop = [], [], False
    for s in (ln.strip() for ln in lines):
        if s.startswith("data_"):
            if "_rlnImageName" in labels:
                break
            labels, rows, in_loop = [], [], False
        elif s == "loop_":
            in_loop = True
        elif in_loop and s.startswith("_"):
            labels.append(s.split()[0])
        elif in_loop and s and not s.startswith("#"):
            rows.append(s)
    return labels, rows


@pytest.mark.parametrize("source", ["particles_relion31.star", "particles_relion30.star"])
def test_star_export_is_a_row_subset_that_imports_to_the_same_particles(data, tmp_path, source):
    table_path = imported(data, source, tmp_path)
    table = read_table(table_path)
    ind = selection()
    np.save(tmp_path / "keep.npy", ind)
    out = tmp_path / "out"
    assert main(["export", str(table_path), "--ind", str(tmp_path / "keep.npy"), "-o", str(out)]) == 0

    exported = np.load(out / "indices.npy")
    np.testing.assert_array_equal(exported, np.sort(ind))       # source order (= table order here)
    assert [int(x) for x in (out / "indices.txt").read_text().split()] == exported.tolist()

    # every block and column of the original, rows picked verbatim
    original = (data / source).read_text()
    text = (out / "keep.star").read_text()
    labels0, rows0 = star_loop_rows(data / source)
    labels1, rows1 = star_loop_rows(out / "keep.star")
    assert labels1 == labels0
    assert rows1 == [rows0[i] for i in exported]
    head = original[: original.index(rows0[0])]
    assert text.startswith(head)                                 # header, optics block, loop labels intact

    # round trip through the importer
    back = import_particles(out / "keep.star", datadir=data)
    assert len(back) == ind.size
    same_particles(back, table.subset(exported))
    np.testing.assert_array_equal(back.particles["rlnImageName"],
                                  table.subset(exported).particles["rlnImageName"])
    assert not (out / "uids.txt").exists()                       # RELION particles have no uids
    summary = json.loads((out / "export.json").read_text())
    assert summary["n"] == 57 and summary["source"] == str((data / source).absolute())


@pytest.mark.parametrize("source", ["particles.cs", "particles_csdat.cs"])
def test_cs_export_keeps_uids_and_every_field_and_writes_a_csg(data, tmp_path, source):
    from cryosparc.dataset import Dataset

    table_path = imported(data, source, tmp_path)
    table = read_table(table_path)
    ind = selection(seed=1)
    np.savetxt(tmp_path / "keep.txt", ind, fmt="%d")
    out = tmp_path / "out"
    assert main(["export", str(table_path), "--ind", str(tmp_path / "keep.txt"), "-o", str(out),
                 "--name", "J99_selected"]) == 0
    rows = np.load(out / "indices.npy")
    np.testing.assert_array_equal(rows, np.sort(ind))

    original = Dataset.load(data / source)
    sub = Dataset.load(out / "J99_selected.cs")
    assert len(sub) == ind.size
    assert sub.fields() == original.fields()
    want = original.take(table.source_rows()[rows])
    for f in original.fields():
        np.testing.assert_array_equal(sub[f], want[f], err_msg=f)
    np.testing.assert_array_equal(np.asarray(sub["uid"], dtype=np.uint64), table.uids()[rows])
    # written in the numpy format, which every cryoSPARC version (and np.load) reads
    assert np.load(out / "J99_selected.cs", allow_pickle=False).shape == (ind.size,)

    uids = [int(x) for x in (out / "uids.txt").read_text().split()]
    assert uids == [int(u) for u in table.uids()[rows]]

    csg = yaml.safe_load((out / "J99_selected.csg").read_text())
    assert set(csg) == {"created", "group", "results", "version"}
    assert csg["group"]["name"] == "particles" and csg["group"]["type"] == "particle"
    assert {"title", "description"} <= set(csg["group"])
    assert set(csg["results"]) == {"blob", "ctf", "alignments3D"}
    for slot, entry in csg["results"].items():
        assert entry == {"metafile": ">J99_selected.cs", "num_items": ind.size, "type": f"particle.{slot}"}

    back = import_particles(out / "J99_selected.cs", datadir=data)
    same_particles(back, table.subset(rows))
    np.testing.assert_array_equal(back.uids(), table.uids()[rows])


def test_chimerax_script_opens_the_series_in_order_at_a_high_percentile(data, tmp_path):
    table_path = imported(data, "particles_relion31.star", tmp_path)
    vols = tmp_path / "vols"
    vols.mkdir()
    rng = np.random.default_rng(2)
    first = None
    for i in [0, 1, 2, 10, 11]:
        v = rng.normal(size=(8, 8, 8)).astype(np.float32)
        first = v if i == 0 else first
        write_mrc(vols / f"vol_{i:d}.mrc", v, 3.0)   # unpadded names: the order must still be numeric
    np.save(tmp_path / "keep.npy", np.arange(10))
    out = tmp_path / "out"
    assert main(["export", str(table_path), "--ind", str(tmp_path / "keep.npy"), "-o", str(out),
                 "--volumes", str(vols)]) == 0
    cxc = (out / "volumes.cxc").read_text().splitlines()
    opens = [ln for ln in cxc if ln.startswith("open ")]
    assert opens == ["open ../vols/vol_0.mrc ../vols/vol_1.mrc ../vols/vol_2.mrc ../vols/vol_10.mrc "
                     "../vols/vol_11.mrc vseries true"]
    level = float(next(ln for ln in cxc if ln.startswith("volume #1")).split("level ")[1])
    assert level == pytest.approx(np.percentile(first, 99.0), rel=1e-5)
    assert "vseries play #1 loop true direction oscillate maxFrameRate 10" in cxc
    # the script is relative to its own folder (ChimeraX runs a .cxc from there)
    text = chimerax_series_script(vols, vols / "here.cxc", level_percentile=90)
    assert "open vol_0.mrc vol_1.mrc" in text


# ---- errors ----------------------------------------------------------------------------------------------
def run_error(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    return err


def test_index_errors(data, tmp_path, capsys):
    table_path = imported(data, "particles_relion31.star", tmp_path)
    capsys.readouterr()
    out = tmp_path / "out"

    def export(ind: str) -> str:
        return run_error(["export", str(table_path), "--ind", str(tmp_path / ind), "-o", str(out)], capsys)

    np.save(tmp_path / "big.npy", np.array([3, 400]))
    assert export("big.npy") == (
        f"drgn export: error: {tmp_path / 'big.npy'}: index 400 is out of range: the table has 400 rows "
        "(0 … 399)")
    np.save(tmp_path / "float.npy", np.array([1.0, 2.0]))
    assert export("float.npy") == (
        f"drgn export: error: {tmp_path / 'float.npy'}: holds float64 values; expected integer row indices "
        "(0-based rows of the canonical table)")
    (tmp_path / "bad.txt").write_text("1\n2\n2.5\n")
    assert export("bad.txt") == (
        f"drgn export: error: {tmp_path / 'bad.txt'}: holds '2.5', not an integer row index (one 0-based "
        "table row per line)")
    np.save(tmp_path / "dup.npy", np.array([5, 7, 5]))
    assert "index 5 appears 2 times" in export("dup.npy")
    np.save(tmp_path / "obj.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    assert "cannot read as a numeric .npy index file" in export("obj.npy")
    assert not out.exists()


def test_source_errors(data, tmp_path, capsys):
    table_path = imported(data, "particles_relion31.star", tmp_path)
    capsys.readouterr()
    np.save(tmp_path / "keep.npy", np.arange(5))
    out = tmp_path / "out"
    base = ["export", str(table_path), "--ind", str(tmp_path / "keep.npy"), "-o", str(out)]
    missing = tmp_path / "nope.star"
    assert run_error([*base, "--source", str(missing)], capsys) == (
        f"drgn export: error: {missing}: source file does not exist (the original STAR or .cs the table was "
        "imported from; pass it with --source)")
    # the recorded source moved away
    (data / "particles_relion31.star").rename(data / "moved.star")
    assert run_error(base, capsys).startswith(
        f"drgn export: error: {(data / 'particles_relion31.star').absolute()}: source file does not exist")
    # a STAR whose rows are not the table's particles is refused, not mis-subset
    lines = (data / "moved.star").read_text().splitlines(keepends=True)
    first = next(i for i, ln in enumerate(lines) if "@stacks/" in ln)
    lines[first], lines[first + 1] = lines[first + 1], lines[first]
    (tmp_path / "shuffled.star").write_text("".join(lines))
    err = run_error([*base, "--source", str(tmp_path / "shuffled.star")], capsys)
    assert err == (f"drgn export: error: {tmp_path / 'shuffled.star'}: particle row 0 (0-based) is "
                   "'000002@stacks/part_a.mrcs' but the table says that particle came from "
                   "'000001@stacks/part_a.mrcs': this is not the STAR file the table was imported from")
    assert not out.exists()


def test_cs_source_must_carry_the_tables_uids(data, tmp_path, capsys):
    from cryosparc.dataset import Dataset

    star_table = imported(data, "particles_relion31.star", tmp_path)
    cs_table = imported(data, "particles.cs", tmp_path)
    capsys.readouterr()
    np.save(tmp_path / "keep.npy", np.arange(3))
    out = tmp_path / "out"
    err = run_error(["export", str(star_table), "--ind", str(tmp_path / "keep.npy"), "-o", str(out),
                     "--source", str(data / "particles.cs")], capsys)
    assert err == (f"drgn export: error: {star_table}: has no cryoSPARC uids (drgnUid), so it was not "
                   "imported from particles.cs; pass the STAR file it came from as --source")
    ds = Dataset.load(data / "particles.cs")
    ds["uid"][1] += 1
    ds.save(tmp_path / "other.cs")
    err = run_error(["export", str(cs_table), "--ind", str(tmp_path / "keep.npy"), "-o", str(out),
                     "--source", str(tmp_path / "other.cs")], capsys)
    assert err.startswith(f"drgn export: error: {tmp_path / 'other.cs'}: row 1 has uid ")
    assert err.endswith("this is not the .cs file the table was imported from")
    assert not out.exists()


def test_outputs_never_overwrite_inputs(data, tmp_path, capsys):
    table_path = imported(data, "particles_relion31.star", tmp_path)
    capsys.readouterr()
    np.save(tmp_path / "keep.npy", np.arange(5))
    before = (data / "particles_relion31.star").read_bytes()
    err = run_error(["export", str(table_path), "--ind", str(tmp_path / "keep.npy"), "-o", str(data),
                     "--name", "particles_relion31"], capsys)
    assert err == (f"drgn export: error: {data / 'particles_relion31.star'}: is an input of this command; "
                   "refusing to overwrite it")
    assert (data / "particles_relion31.star").read_bytes() == before


def test_read_index_file_accepts_int_npy_and_txt(tmp_path):
    np.save(tmp_path / "a.npy", np.array([[4], [2]], dtype=np.int32))
    np.testing.assert_array_equal(read_index_file(tmp_path / "a.npy", 5), [4, 2])
    (tmp_path / "a.txt").write_text("4\n2\n")
    assert read_index_file(tmp_path / "a.txt", 5).dtype == np.int64
