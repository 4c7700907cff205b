"""File formats: STAR writing, RELION/cryoSPARC writers ↔ readers, uids, stack lists, MRC modes, stacks."""

from __future__ import annotations

import json
import os
import re

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from helpers_io import FIXTURE, small_dataset, write_stack

from drgn_core.errors import InputError
from drgn_core.importing import import_particles
from drgn_core.io import (
    ImageSource,
    ParticleTable,
    StackList,
    open_stack,
    read_images,
    read_stacklist,
    read_table,
    write_cs,
    write_relion_star,
    write_star,
    write_table,
)


# ---- STAR writer -------------------------------------------------------------------------------------
def test_write_star_round_trips_through_starfile(tmp_path):
    df = pd.DataFrame({
        "rlnImageName": ["000001@a b/s.mrcs", "000002@s.mrcs", "000003@s.mrcs"],
        "rlnAngleRot": [1.23456789, -0.0, 1e20],
        "rlnGroupNumber": [1, 2, 3],
        "drgnUid": ["18446744073709551615", "", "9223372036854775808"],
        "drgnGtCoord": [np.nan, 0.5, 0.25],
        "drgnGtJunk": [True, False, True],
    })
    path = tmp_path / "x.star"
    write_star({"particles": df}, path)
    back = starfile.read(path, always_dict=True, parse_as_string=["rlnImageName", "drgnUid"])["particles"]
    assert back["rlnImageName"].tolist() == df["rlnImageName"].tolist()  # quoted because of the space
    np.testing.assert_allclose(back["rlnAngleRot"], [1.234568, 0.0, 1e20])  # 6 decimals, like %.6f
    assert back["rlnGroupNumber"].tolist() == [1, 2, 3]
    assert back["drgnUid"].fillna("").tolist() == df["drgnUid"].tolist()  # empty string survives as ""
    assert np.isnan(back["drgnGtCoord"][0]) and back["drgnGtCoord"][1] == 0.5
    assert back["drgnGtJunk"].tolist() == [1, 0, 1]
    assert "data_particles" in path.read_text()


# ---- RELION STAR writer ------------------------------------------------------------------------------
def test_write_relion_star_round_trip(tmp_path):
    src = import_particles(FIXTURE / "particles_relion30.star")
    out = tmp_path / "sub" / "plain.star"
    write_relion_star(src, out)
    blocks = starfile.read(out, always_dict=True, parse_as_string=["rlnImageName"])
    assert set(blocks) == {"optics", "particles"}
    assert all(c.startswith("rln") for c in blocks["particles"].columns)
    # RELION 3.0's pixel origins and per-particle optics are not carried into a 3.1 particle block.
    assert not {"rlnOriginX", "rlnVoltage", "rlnMagnification"} & set(blocks["particles"].columns)
    rel = os.path.relpath(FIXTURE / "stacks" / "part_a.mrcs", out.parent)
    assert blocks["particles"]["rlnImageName"][0] == f"000001@{rel}"
    back = import_particles(out)
    assert back.provenance["source_format"] == "star31"
    np.testing.assert_allclose(back.poses(), src.poses(), atol=1e-6)
    np.testing.assert_allclose(back.shifts_A(), src.shifts_A(), atol=1e-5)
    np.testing.assert_allclose(back.ctf_params(), src.ctf_params(), rtol=1e-7)
    np.testing.assert_array_equal(back.stack_paths(), src.stack_paths())
    np.testing.assert_array_equal(back.stack_indices(), src.stack_indices())


def test_write_relion_star_with_given_image_names(tmp_path):
    star, _ = small_dataset(tmp_path)
    t = import_particles(star)
    names = [f"{i + 1:06d}@elsewhere/x.mrcs" for i in range(len(t))]
    write_relion_star(t, tmp_path / "named.star", image_names=names)
    back = starfile.read(tmp_path / "named.star", parse_as_string=["rlnImageName"], always_dict=True)
    assert back["particles"]["rlnImageName"].tolist() == names


# ---- cryoSPARC writer and uids -----------------------------------------------------------------------
def test_write_cs_loads_in_cryosparc_tools_and_round_trips(tmp_path):
    from cryosparc.dataset import Dataset

    src = import_particles(FIXTURE / "particles_relion31.star")
    big = np.array([2**64 - 1, 2**63, 2**63 + 12345, 7], dtype=np.uint64)
    uids = np.concatenate([big, np.arange(100, 100 + len(src) - 4, dtype=np.uint64)])
    src.particles["drgnUid"] = uids.astype(str)
    out = tmp_path / "cs" / "out.cs"
    write_cs(src, out)
    assert out.read_bytes()[:6] == b"\x93NUMPY"
    d = Dataset.load(out)
    np.testing.assert_array_equal(d["uid"], uids)
    assert d["blob/path"][0] == ">" + os.path.relpath(FIXTURE / "stacks" / "part_a.mrcs", out.parent)
    assert d["blob/idx"][200] == 0 and d["blob/idx"][199] == 199
    np.testing.assert_array_equal(d["blob/shape"][0], [48, 48])
    back = import_particles(out)
    np.testing.assert_array_equal(back.uids(), uids)  # exact, beyond 2^63 too
    np.testing.assert_allclose(back.poses(), src.poses(), atol=1e-5)
    np.testing.assert_allclose(back.shifts_A(), src.shifts_A(), atol=1e-5)
    np.testing.assert_allclose(back.ctf_params(), src.ctf_params(), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(back.particles["rlnOpticsGroup"], src.particles["rlnOpticsGroup"])
    rows = np.arange(0, 400, 37)
    np.testing.assert_array_equal(read_images(back, rows), read_images(src, rows))


def test_write_cs_draws_seeded_uids_and_stores_them(tmp_path):
    star, _ = small_dataset(tmp_path)
    a, b = import_particles(star), import_particles(star)
    assert a.uids() is None
    ua, ub = write_cs(a, tmp_path / "a.cs", seed=5), write_cs(b, tmp_path / "b.cs", seed=5)
    np.testing.assert_array_equal(ua, ub)
    assert len(np.unique(ua)) == len(a)
    np.testing.assert_array_equal(a.uids(), ua)  # stored back into the table
    write_table(a, tmp_path / "t.star")
    np.testing.assert_array_equal(read_table(tmp_path / "t.star").uids(), ua)
    assert not np.array_equal(write_cs(import_particles(star), tmp_path / "c.cs", seed=6), ua)


def test_dark_images_keep_their_sign_through_cs(tmp_path):
    star, images = small_dataset(tmp_path, counts=(5,))
    t = import_particles(star)
    t.particles["drgnImageSign"] = -1
    write_cs(t, tmp_path / "dark.cs")
    back = import_particles(tmp_path / "dark.cs")
    np.testing.assert_array_equal(read_images(back, np.arange(5)), -images)


# ---- stack lists -------------------------------------------------------------------------------------
def test_read_stacklist(tmp_path):
    write_stack(tmp_path / "st" / "a.mrcs", np.arange(3 * 16, dtype=np.float32).reshape(3, 4, 4), 1.5)
    write_stack(tmp_path / "b.mrcs", np.ones((2, 4, 4)), 1.5)
    lst = tmp_path / "list.txt"
    lst.write_text("# my stacks\nst/a.mrcs\n\n" + str(tmp_path / "b.mrcs") + "\n")
    sl = read_stacklist(lst)
    assert isinstance(sl, StackList) and sl.n == 5 and sl.box == 4 and sl.apix == pytest.approx(1.5)
    paths, idx = sl.locate(np.array([4, 0, 2, 3]))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["b.mrcs", "a.mrcs", "a.mrcs", "b.mrcs"]
    assert idx.tolist() == [1, 0, 2, 0]
    with pytest.raises(InputError, match="row out of range"):
        sl.locate(np.array([5]))


def test_read_stacklist_errors(tmp_path):
    write_stack(tmp_path / "a.mrcs", np.zeros((2, 4, 4)))
    write_stack(tmp_path / "c.mrcs", np.zeros((2, 6, 6)))
    lst = tmp_path / "list.txt"
    lst.write_text("a.mrcs\nmissing.mrcs\nc.mrcs\n")
    with pytest.raises(InputError) as e:
        read_stacklist(lst)
    msg = str(e.value)
    assert msg.startswith(f"{lst}: 2 problems: line 2: stack missing.mrcs not found")
    assert "stacks have different image sizes: 4×4 (lines 1), 6×6 (lines 3)" in msg
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(InputError, match="lists no stacks"):
        read_stacklist(tmp_path / "empty.txt")


# ---- MRC modes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,mode", [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6),
                                        (np.float16, 12)])
def test_images_read_from_every_mrc_mode(tmp_path, dtype, mode):
    star, _ = small_dataset(tmp_path, counts=(3,))
    data = (np.arange(3 * 64).reshape(3, 8, 8) % 100).astype(dtype)
    write_stack(tmp_path / "stacks" / "s0.mrcs", data, 2.0, mode_dtype=dtype)
    with mrcfile.open(tmp_path / "stacks" / "s0.mrcs", header_only=True) as m:
        assert int(m.header.mode) == mode
    t = import_particles(star)
    got = read_images(t, np.array([2, 0]))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, data[[2, 0]].astype(np.float32))


def test_read_images_preserves_order_and_sign(tmp_path):
    star, images = small_dataset(tmp_path, counts=(4, 3, 5))
    t = import_particles(star)
    t.particles.loc[[1, 6], "drgnImageSign"] = -1
    rows = np.array([11, 1, 6, 0, 6, 4])
    expected = images[rows] * np.array([1, -1, -1, 1, -1, 1], dtype=np.float32)[:, None, None]
    np.testing.assert_array_equal(read_images(t, rows), expected)
    # With one stack mapped at a time (the limit that protects file descriptors), results are the same.
    src = ImageSource(t, max_open=1)
    np.testing.assert_array_equal(src.read(rows), expected)
    np.testing.assert_array_equal(np.concatenate([x for _, x in src.chunks(5)]),
                                  images * t.image_signs()[:, None, None])
    assert len(src._open) == 1


# ---- our stacks and their sidecar --------------------------------------------------------------------
def test_open_stack_checks_its_sidecar(tmp_path):
    from drgn_core.cli import main

    star, _ = small_dataset(tmp_path)
    assert main(["import", str(star), "-o", str(tmp_path / "t.star")]) == 0
    assert main(["downsample", str(tmp_path / "t.star"), "-D", "4", "-o", str(tmp_path / "p.4.mrcs")]) == 0
    t = read_table(tmp_path / "t.star")
    s = open_stack(tmp_path / "p.4.mrcs", table=t)
    assert (s.D, s.n, s.D0, s.apix, s.apix0) == (4, 7, 8, pytest.approx(4.0), pytest.approx(2.0))
    assert not s.images.flags.writeable
    side = tmp_path / "p.4.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "n": 9}))
    with pytest.raises(InputError, match=re.escape("sidecar p.4.json says n=9 but the stack holds 7 images")):
        open_stack(tmp_path / "p.4.mrcs")
    side.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="holds 7 images but the particle table has 3 rows"):
        open_stack(tmp_path / "p.4.mrcs", table=t.subset(np.arange(3)))


def test_open_stack_without_sidecar_falls_back_to_table(tmp_path):
    star, images = small_dataset(tmp_path)
    t = import_particles(star)
    write_stack(tmp_path / "particles.mrcs", images, 2.0)
    with pytest.raises(InputError, match=re.escape("has no sidecar particles.json")):
        open_stack(tmp_path / "particles.mrcs")
    s = open_stack(tmp_path / "particles.mrcs", table=t)
    assert (s.D, s.D0, s.apix, s.n) == (8, 8, pytest.approx(2.0), 7)
    np.testing.assert_array_equal(s.images, images)
    write_stack(tmp_path / "small.mrcs", images[:, :4, :4], 2.0)
    with pytest.raises(InputError, match="its box 4 differs from the particle table's 8"):
        open_stack(tmp_path / "small.mrcs", table=t)


def test_public_names_are_reexported():
    import drgn_core.io as io

    for name in ("read_relion_star", "read_cs", "write_relion_star", "write_cs", "read_images",
                 "iter_image_chunks", "open_stack", "ParticleStack", "read_stacklist", "read_table",
                 "write_table", "read_mrc", "write_mrc"):
        assert hasattr(io, name), name
    assert io.ParticleTable is ParticleTable


def test_relion5_extra_columns_are_kept(tmp_path):
    from helpers_io import default_optics, default_particles, star_text

    write_stack(tmp_path / "s.mrcs", np.zeros((2, 8, 8)))
    parts = default_particles(["1@s.mrcs", "2@s.mrcs"], np.random.default_rng(0))
    parts |= {"rlnMicrographName": ["MotionCorr/job002/a.mrc", "MotionCorr/job002/b.mrc"],
              "rlnClassNumber": [1, 2], "rlnNormCorrection": [0.98, 1.02], "rlnHelicalTubeID": [3, 3]}
    optics = default_optics() | {"rlnMicrographOriginalPixelSize": [1.0],
                                 "rlnCtfDataAreCtfPremultiplied": [0]}
    (tmp_path / "run_data.star").write_text(star_text(parts, optics))
    t = import_particles(tmp_path / "run_data.star")
    assert t.particles["rlnMicrographName"].tolist() == parts["rlnMicrographName"]
    assert t.particles["rlnNormCorrection"].tolist() == [0.98, 1.02]
    assert (t.particles["rlnPhaseShift"] == 0).all()  # absent → 0
    write_relion_star(t, tmp_path / "out.star")
    back = starfile.read(tmp_path / "out.star", always_dict=True)
    assert back["particles"]["rlnHelicalTubeID"].tolist() == [3, 3]
    assert back["optics"]["rlnMicrographOriginalPixelSize"].tolist() == [1.0]
