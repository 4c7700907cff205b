"""Poses and CTF from a second file (`drgn import TABLE --poses --ctf`), cryoDRGN's pickles behind
--allow-pickle, `.txt` stack lists, and `.cs` stack paths that name the authors' project (issue 12).

The known answers are the conventions fixture's truth.npz (written by independent code). cryoDRGN's
``poses.pkl`` is built here the way cryoDRGN's ``parse_pose_star`` / ``parse_pose_csparc`` build it (read
from its public source): rot is RELION's Euler angles as Rz(psi)·Ry(tilt)·Rz(rot) (Ry with cryoDRGN's
sign, +sin below the diagonal) with the four off-diagonal entries (0,1), (1,0), (1,2), (2,1) negated, or
the transpose of the rotation matrix of cryoSPARC's rotation vector; trans is the origin in pixels
divided by the box D.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_io import FIXTURE

from drgn_core.cli import main
from drgn_core.errors import InputError
from drgn_core.importing import import_particles

D = 48


@pytest.fixture(scope="module")
def truth():
    return dict(np.load(FIXTURE / "truth.npz", allow_pickle=False))


@pytest.fixture(scope="module")
def reference():
    """The plain RELION 3.1 import every other route must reproduce."""
    return import_particles(FIXTURE / "particles_relion31.star")


def cryodrgn_rot_from_relion(euler_deg: np.ndarray) -> np.ndarray:
    """cryoDRGN's rotation for RELION angles (see the module docstring)."""
    a, b, y = np.deg2rad(euler_deg).T
    n = len(a)

    def rz(t):
        out = np.zeros((n, 3, 3))
        out[:, 0, 0], out[:, 0, 1], out[:, 1, 0], out[:, 1, 1] = np.cos(t), -np.sin(t), np.sin(t), np.cos(t)
        out[:, 2, 2] = 1
        return out

    ry = np.zeros((n, 3, 3))
    ry[:, 0, 0], ry[:, 0, 2], ry[:, 2, 0], ry[:, 2, 2] = np.cos(b), -np.sin(b), np.sin(b), np.cos(b)
    ry[:, 1, 1] = 1
    flip = np.array([[1, -1, 1], [-1, 1, -1], [1, -1, 1]])
    return rz(y) @ ry @ rz(a) * flip


def fixture_star_columns(name: str, *columns: str) -> np.ndarray:
    from drgn_core.io.star_format import read_star_blocks

    blocks = read_star_blocks(FIXTURE / name)
    df = blocks["particles"] if "particles" in blocks else blocks[""]
    return df[list(columns)].to_numpy(dtype=np.float64)


def write_pickle(path: Path, obj) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=3)  # what cryoDRGN's files are
    return path


def poses_pkl_from_star(tmp: Path) -> Path:
    """cryoDRGN's parse_pose_star of the fixture's RELION 3.0 STAR (origins in pixels)."""
    euler = fixture_star_columns("particles_relion30.star", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    origin_px = fixture_star_columns("particles_relion30.star", "rlnOriginX", "rlnOriginY")
    return write_pickle(tmp / "poses.pkl", (cryodrgn_rot_from_relion(euler), origin_px / D))


def poses_pkl_from_cs(tmp: Path) -> Path:
    """cryoDRGN's parse_pose_csparc of the fixture's .cs: float32, rot = R(rotvec)ᵀ, trans = shift / D."""
    from scipy.spatial.transform import Rotation

    cs = np.load(FIXTURE / "particles.cs")
    rot = Rotation.from_rotvec(cs["alignments3D/pose"].astype(np.float64)).as_matrix().transpose(0, 2, 1)
    trans = cs["alignments3D/shift"] / D
    return write_pickle(tmp / "poses_cs.pkl", (rot.astype(np.float32), trans.astype(np.float32)))


def ctf_pkl(tmp: Path, truth: dict) -> Path:
    """cryoDRGN's ctf.pkl: float32 (N, 9) D, Å/px, dfU, dfV, dfang, kV, Cs, w, phase."""
    n = len(truth["A"])
    ctf = np.column_stack([np.full(n, D), np.full(n, 3.0), truth["defocus_u"], truth["defocus_v"],
                           truth["defocus_angle_deg"], truth["voltage_kv"], truth["cs_mm"],
                           truth["amp_contrast"], truth["phase_shift_deg"]]).astype(np.float32)
    return write_pickle(tmp / "ctf.pkl", ctf)


def assert_same_table(a, b, shift_atol: float = 2e-3, ctf_atol: float = 1e-6) -> None:
    assert len(a) == len(b) and a.box == b.box and a.apix == pytest.approx(b.apix)
    np.testing.assert_allclose(a.poses(), b.poses(), atol=1e-5)
    np.testing.assert_allclose(a.shifts_A(), b.shifts_A(), atol=shift_atol)
    np.testing.assert_allclose(a.ctf_params(), b.ctf_params(), atol=ctf_atol, rtol=1e-6)
    np.testing.assert_array_equal(a.stack_indices(), b.stack_indices())
    np.testing.assert_array_equal([Path(p).stem for p in a.stack_paths()],
                                  [Path(p).stem for p in b.stack_paths()])


# ---- cryoDRGN's pose convention, pinned -------------------------------------------------------------
@pytest.mark.parametrize("maker", [poses_pkl_from_star, poses_pkl_from_cs])
def test_cryodrgn_poses_pkl_imports_to_the_true_poses(tmp_path, truth, maker):
    pkl = maker(tmp_path)
    t = import_particles(FIXTURE / "particles_relion31.star", poses=pkl, allow_pickle=True)
    np.testing.assert_allclose(t.poses(), truth["A"], atol=1e-5)  # cryoDRGN's rot is our A itself
    np.testing.assert_allclose(t.shifts_A(), truth["origin_A"], atol=2e-3)  # trans × D × Å/px
    assert t.provenance["poses_matched_by"] == "order"


def test_cryodrgn_pose_convention_with_our_projector(tmp_path):
    """Our projector at the imported cryoDRGN pose and shift draws the fixture's projections."""
    from drgn_core.io.mrc import read_mrc
    from drgn_core.projection import render_images

    t = import_particles(FIXTURE / "particles_relion31.star", poses=poses_pkl_from_cs(tmp_path),
                         allow_pickle=True)
    vol, _ = read_mrc(FIXTURE / "volume.mrc", mmap=False)
    proj, _ = read_mrc(FIXTURE / "projections.mrcs", mmap=False)
    k = slice(0, 40)
    ours = render_images(vol.astype(np.float64), t.poses()[k], t.shifts_px()[k], None)
    a = ours.reshape(40, -1) - ours.reshape(40, -1).mean(1, keepdims=True)
    b = proj[k].reshape(40, -1) - proj[k].reshape(40, -1).mean(1, keepdims=True)
    cc = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    assert cc.min() >= 0.99
    # …and the transposed matrix (the other reading of "rot") would not.
    wrong = render_images(vol.astype(np.float64), t.poses()[k].transpose(0, 2, 1), t.shifts_px()[k], None)
    w = wrong.reshape(40, -1) - wrong.reshape(40, -1).mean(1, keepdims=True)
    assert np.median((w * b).sum(1) / np.sqrt((w * w).sum(1) * (b * b).sum(1))) < 0.9


# ---- the paper's inputs: stack list + poses.pkl + ctf.pkl -------------------------------------------
def test_stack_list_with_cryodrgn_pickles_gives_the_relion31_table(tmp_path, truth, reference, capsys):
    lst = tmp_path / "particles.txt"
    lst.write_text(f"{FIXTURE / 'stacks' / 'part_a.mrcs'}\n# comment\n{FIXTURE / 'stacks' / 'part_b.mrcs'}\n")
    poses, ctf = poses_pkl_from_star(tmp_path), ctf_pkl(tmp_path, truth)
    out = tmp_path / "table.star"
    assert main(["import", str(lst), "--poses", str(poses), "--ctf", str(ctf), "--allow-pickle",
                 "-o", str(out)]) == 0
    assert "rows matched by order" in capsys.readouterr().out
    from drgn_core.io.table import read_table

    t = read_table(out)
    assert_same_table(t, reference, ctf_atol=0.01)  # float32 defocus in the pickle
    np.testing.assert_array_equal(t.particles["rlnOpticsGroup"].to_numpy(), truth["optics_group"])


def test_stack_list_needs_poses_and_ctf(tmp_path, capsys):
    lst = tmp_path / "particles.txt"
    lst.write_text(f"{FIXTURE / 'stacks' / 'part_a.mrcs'}\n")
    out = tmp_path / "t.star"
    assert main(["import", str(lst), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"drgn import: error: {lst}: is a stack list, which holds images only: give the poses "
                   "with --poses and the CTF with --ctf (e.g. cryoDRGN's poses.pkl and ctf.pkl, with "
                   "--allow-pickle)")
    assert not out.exists()


# ---- pickles are refused unless allowed, and only numpy globals ever load ---------------------------
def test_pickles_need_allow_pickle(tmp_path, truth, capsys):
    poses = poses_pkl_from_star(tmp_path)
    out = tmp_path / "t.star"
    star = FIXTURE / "particles_relion31.star"
    assert main(["import", str(star), "--poses", str(poses), "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"drgn import: error: {poses}: not read: it is a Python pickle, which can run code when read; give "
        "--allow-pickle to read a cryoDRGN pickle you trust")
    assert not out.exists()


class _Payload:
    """Unpickling this would create a file (were the global admitted)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("make", [
    lambda tmp: _Payload(tmp / "pwned"),
    lambda tmp: (np.eye(3)[None], {"a": __import__("collections").OrderedDict()}),
    lambda tmp: (np.eye(3)[None], np.random.default_rng(0)),  # a numpy global outside the list
])
def test_a_pickle_with_any_other_global_is_refused(tmp_path, make):
    pkl = write_pickle(tmp_path / "poses.pkl", make(tmp_path))
    with pytest.raises(InputError, match=r"names the global \S+, which a cryoDRGN pickle never holds|"
                                         r"cannot read as a cryoDRGN poses.pkl") as e:
        import_particles(FIXTURE / "particles_relion31.star", poses=pkl, allow_pickle=True)
    assert str(e.value).startswith(f"{pkl}: cannot read as a cryoDRGN poses.pkl")
    assert not (tmp_path / "pwned").exists()


def test_the_refused_global_is_named(tmp_path):
    pkl = write_pickle(tmp_path / "poses.pkl", _Payload(tmp_path / "pwned"))
    with pytest.raises(InputError) as e:
        import_particles(FIXTURE / "particles_relion31.star", poses=pkl, allow_pickle=True)
    assert str(e.value) == (f"{pkl}: cannot read as a cryoDRGN poses.pkl: it names the global "
                            "io.open, which a cryoDRGN pickle never holds; refusing to load it")


def test_both_numpy_spellings_are_admitted(tmp_path):
    """A NumPy 1 pickle names numpy.core.multiarray, a NumPy 2 one numpy._core.multiarray: both load."""
    from drgn_core.io.pickles import read_index_pkl

    data = pickle.dumps([np.int64(5), np.int64(2)], protocol=3)
    for mod in (b"numpy.core.multiarray", b"numpy._core.multiarray"):
        other = b"numpy._core.multiarray" if mod == b"numpy.core.multiarray" else b"numpy.core.multiarray"
        text = data.replace(other, mod)
        assert mod in text
        p = tmp_path / "x.pkl"
        p.write_bytes(text)
        np.testing.assert_array_equal(read_index_pkl(p, allow_pickle=True), [5, 2])


# ---- index pickles wherever an index file is --------------------------------------------------------
@pytest.mark.parametrize("value", [np.array([7, 3, 9, 0], dtype=np.int64),
                                   [np.int64(7), np.int64(3), np.int64(9), np.int64(0)]])
def test_cryodrgn_index_pickle_keeps_its_order(tmp_path, value):
    from drgn_core.io.indices import read_index_file

    p = write_pickle(tmp_path / "filtered.ind.pkl", value)
    np.testing.assert_array_equal(read_index_file(p, 10, allow_pickle=True), [7, 3, 9, 0])
    with pytest.raises(InputError, match="give --allow-pickle"):
        read_index_file(p, 10)
    with pytest.raises(InputError, match="index 7 is out of range: the table has 5 rows"):
        read_index_file(p, 5, allow_pickle=True)


def test_index_pickle_on_the_command_line(tmp_path, reference, capsys):
    """`drgn backproject --ind x.ind.pkl --allow-pickle` reads it (and without the flag refuses it)."""
    from drgn_core.io.table import write_table

    table = tmp_path / "table.star"
    write_table(reference, table)
    ind = write_pickle(tmp_path / "filtered.ind.pkl", [np.int64(3), np.int64(1), np.int64(2)])
    out = tmp_path / "bp"
    assert main(["backproject", str(table), "-o", str(out), "--ind", str(ind)]) == 2
    assert "give --allow-pickle" in capsys.readouterr().err
    assert main(["backproject", str(table), "-o", str(out), "--ind", str(ind), "--allow-pickle"]) == 0


# ---- poses from a .cs of another project; counts; uids ----------------------------------------------
def cs_copy(path: Path, paths: bytes | None = None, rows: slice | np.ndarray | None = None) -> Path:
    cs = np.load(FIXTURE / "particles.cs")
    if rows is not None:
        cs = cs[rows]
    if paths is not None:
        cs["blob/path"] = paths
    with open(path, "wb") as f:
        np.save(f, cs)
    return path


def test_relion30_mrc_stacks_with_poses_from_another_projects_cs(tmp_path, reference):
    """The issue's case: RELION 3.0 STAR (magnification × detector pixel, .mrc stacks, no poses) + poses
    in a .cs whose paths name the authors' project → the same table as the plain RELION 3.1 file."""
    from test_import_overrides import relion30_copy

    star = relion30_copy(tmp_path, drop=("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX",
                                         "rlnOriginY"), stack_suffix=".mrc")
    poses = cs_copy(tmp_path / "P11_J4_003.cs", b">J1/imported/015391478021542412573_dark.mrcs")
    t = import_particles(star, poses=poses)
    assert t.provenance["poses_matched_by"] == "order"
    assert_same_table(t, reference)
    with pytest.raises(InputError, match="has no pose columns rlnAngleRot, rlnAngleTilt, rlnAnglePsi"):
        import_particles(star)


def test_cs_stack_paths_of_another_project_resolve_by_name(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURE / "stacks" / "dark.mrcs", data / "dark.mrcs")
    cs = cs_copy(tmp_path / "P11_J4_003.cs", b">J1/imported/015391478021542412573_dark.mrcs")
    t = import_particles(cs, datadir=data)
    assert set(t.stack_paths()) == {str(data / "dark.mrcs")}
    assert_same_table(t, import_particles(FIXTURE / "particles.cs"))


def test_poses_matched_by_uid_when_both_have_uids(tmp_path, truth):
    """A .cs table with poses from a .cs in another row order: rows are paired by uid."""
    shutil.copytree(FIXTURE / "stacks", tmp_path / "stacks")
    table_cs = cs_copy(tmp_path / "ctf.cs")
    perm = np.random.default_rng(0).permutation(len(truth["A"]))
    poses = cs_copy(tmp_path / "poses.cs", rows=perm)
    t = import_particles(table_cs, poses=poses)
    assert t.provenance["poses_matched_by"] == "uid"
    np.testing.assert_allclose(t.poses(), truth["A"], atol=1e-5)
    np.testing.assert_allclose(t.shifts_A(), truth["origin_A"], atol=2e-3)


def test_count_mismatches_are_refused(tmp_path, truth):
    short = cs_copy(tmp_path / "poses.cs", rows=slice(0, 399))
    star = FIXTURE / "particles_relion31.star"
    with pytest.raises(InputError) as e:
        import_particles(star, poses=short)
    assert str(e.value) == (f"{star}: the poses file {short} holds 399 particles but particles_relion31.star "
                            "holds 400; they must describe the same particles (rows are matched by order, "
                            "or by uid when both files have cryoSPARC uids)")
    row = np.array([48, 3, 1e4, 1e4, 0, 300, 2.7, 0.1, 0], dtype=np.float32)
    ctf = write_pickle(tmp_path / "ctf.pkl", np.tile(row, (3, 1)))
    with pytest.raises(InputError) as e:
        import_particles(star, ctf=ctf, allow_pickle=True)
    assert str(e.value) == (f"{ctf}: holds CTF parameters for 3 particles but the particle table holds 400; "
                            "rows are matched by order")


def test_damaged_dtype_flags_cannot_crash_numpy(tmp_path):
    """A pickle whose dtype state claims the float dtype holds Python objects (flags byte changed) puts
    numpy's own __setstate__ into an internal error (SystemError; in the fuzz tests, an interpreter
    abort); our stand-ins ignore the flags and rebuild the array from its bytes."""
    from drgn_core.io.pickles import read_ctf_pkl

    ctf = np.tile(np.array([64, 2, 1e4, 1e4, 0, 300, 2.7, 0.1, 0], dtype=np.float32), (4, 1))
    data = pickle.dumps(ctf, protocol=3)
    flags_at = data.index(b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00") + 10  # ..., -1, -1, flags=0)
    assert data[flags_at:flags_at + 2] == b"K\x00"
    bad = data[:flags_at] + b"K\x3f" + data[flags_at + 2:]  # NPY_ITEM_REFCOUNT and friends
    p = tmp_path / "ctf.pkl"
    p.write_bytes(bad)
    np.testing.assert_array_equal(read_ctf_pkl(p, allow_pickle=True), ctf)


@pytest.mark.parametrize("obj,message", [
    ((np.zeros((0, 3, 3)), np.zeros((0, 2))), "the rotations holds no rows"),
    ((np.tile(np.eye(3), (2, 1, 1)), np.zeros((3, 2))), "holds 2 rotations but 3 translations"),
    ((np.tile(2 * np.eye(3), (2, 1, 1)), np.zeros((2, 2))), "rotation 0 is not a rotation matrix"),
    ((np.eye(3)[None], np.full((1, 2), np.nan)), "the translations row 0 holds NaN or infinite values"),
    ({"rot": np.eye(3)}, "holds a dict; a cryoDRGN poses.pkl holds a tuple"),
])
def test_malformed_poses_pkl(tmp_path, obj, message):
    from drgn_core.io.pickles import read_poses_pkl

    p = write_pickle(tmp_path / "poses.pkl", obj)
    with pytest.raises(InputError) as e:
        read_poses_pkl(p, allow_pickle=True)
    assert str(e.value).startswith(f"{p}: {message}")
