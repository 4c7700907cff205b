"""The canonical particle table: round trip through STAR, accessors in our conventions, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from drgn_core.ctf import CTF_COLUMNS
from drgn_core.errors import InputError
from drgn_core.io.table import ParticleTable, read_table, write_table
from drgn_core.pose import euler_to_matrix


def make_table(n: int = 5) -> ParticleTable:
    rng = np.random.default_rng(0)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["og1", "og2"], "rlnOpticsGroup": [1, 2], "rlnVoltage": [300.0, 200.0],
        "rlnSphericalAberration": [2.7, 1.4], "rlnAmplitudeContrast": [0.1, 0.07],
        "rlnImagePixelSize": [1.5, 1.5], "rlnImageSize": [64, 64], "rlnImageDimensionality": [2, 2],
    })
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)],
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.uniform(-5, 5, n), "rlnOriginYAngst": rng.uniform(-5, 5, n),
        "rlnDefocusU": rng.uniform(1e4, 2e4, n), "rlnDefocusV": rng.uniform(1e4, 2e4, n),
        "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnPhaseShift": np.zeros(n),
        "rlnOpticsGroup": [1, 2, 1, 2, 1][:n],
        "drgnStackPath": ["stack.mrcs"] * n, "drgnStackIndex": np.arange(n), "drgnImageSign": np.ones(n),
        "drgnSourceRow": np.arange(n),
        "drgnUid": [str(2**63 + 12345 + i) for i in range(n)],
    })
    return ParticleTable(particles, optics)


def test_round_trip_keeps_values_and_uids(tmp_path):
    t = make_table()
    write_table(t, tmp_path / "t.star", source_path="x.star")
    r = read_table(tmp_path / "t.star")
    assert len(r) == 5 and r.box == 64 and r.apix == 1.5
    np.testing.assert_allclose(r.poses(), t.poses(), atol=1e-5)
    np.testing.assert_allclose(r.shifts_A(), t.shifts_A(), atol=1e-5)
    np.testing.assert_allclose(r.ctf_params(), t.ctf_params(), atol=1e-4)
    assert r.uids().dtype == np.uint64
    assert int(r.uids()[0]) == 2**63 + 12345  # beyond int64: must not go through float
    assert r.provenance["source_path"] == "x.star"
    assert r.stack_paths()[0] == str((tmp_path / "stack.mrcs").resolve())


def test_ctf_params_follow_optics_groups_and_downsampled_pixel_size():
    t = make_table()
    p = t.ctf_params(apix=3.0)
    assert p.shape == (5, len(CTF_COLUMNS))
    assert np.all(p[:, 0] == 3.0)
    np.testing.assert_array_equal(p[:, 4], [300, 200, 300, 200, 300])  # kV per particle from its group
    np.testing.assert_array_equal(p[:, 5], [2.7, 1.4, 2.7, 1.4, 2.7])
    np.testing.assert_allclose(t.shifts_px(3.0), t.shifts_A() / 3.0)


def test_poses_match_relion_definition():
    t = make_table()
    e = t.euler()
    from scipy.spatial.transform import Rotation

    A0 = Rotation.from_euler("ZYZ", e[0], degrees=True).as_matrix().T
    np.testing.assert_allclose(t.poses()[0], A0, atol=1e-12)
    np.testing.assert_allclose(euler_to_matrix(e), t.poses())


def test_unknown_optics_group_is_a_clear_error():
    t = make_table()
    t.particles.loc[2, "rlnOpticsGroup"] = 7
    with pytest.raises(InputError, match="optics group 7"):
        t.ctf_params()


def test_subset_out_of_range_and_order():
    t = make_table()
    s = t.subset([4, 0])
    assert list(s.source_rows()) == [4, 0]
    with pytest.raises(InputError, match="index out of range: table has 5 rows"):
        t.subset([5])


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_table(tmp_path / "missing.star")
    bad = tmp_path / "bad.star"
    bad.write_text("data_particles\n\nloop_\n_rlnImageName #1\n1@a.mrcs\n")
    with pytest.raises(InputError) as e:
        read_table(bad)
    assert str(bad) in str(e.value)
