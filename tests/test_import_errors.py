"""Bad input to `drgn import`: exit status 2, one line naming the file and the problem, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers_io import default_optics, default_particles, small_dataset, star_text, write_stack

from drgn_core.cli import main


def run_import(capsys, inp: Path, out: Path, *extra: str) -> str:
    """Run `drgn import`, assert failure without output or leftovers, return the message after 'error: '."""
    rc = main(["import", str(inp), "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp files
    # Progress bars (stderr, '\r'-separated) may precede it; the error itself is exactly one line.
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if "error" in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"drgn import: error: {inp}: ")
    return lines[0].removeprefix(f"drgn import: error: {inp}: ")


def edit_star(star: Path, old: str, new: str) -> None:
    text = star.read_text()
    assert old in text
    star.write_text(text.replace(old, new, 1))


def test_missing_stack(tmp_path, capsys):
    star, _ = small_dataset(tmp_path)
    edit_star(star, "000002@stacks/s1.mrcs", "000002@stacks/gone.mrcs")
    msg = run_import(capsys, star, tmp_path / "t.star")
    assert "stack stacks/gone.mrcs not found (row 5; looked for " in msg
    assert str(tmp_path / "stacks" / "gone.mrcs") in msg


def test_stack_shorter_than_star(tmp_path, capsys):
    star, _ = small_dataset(tmp_path, counts=(4, 3))
    edit_star(star, "000003@stacks/s1.mrcs", "000005@stacks/s1.mrcs")
    msg = run_import(capsys, star, tmp_path / "t.star")
    assert msg == "1 problems: row 6: rlnImageName 000005@stacks/s1.mrcs but stacks/s1.mrcs holds 3 images"


def test_cs_without_pose(tmp_path, capsys):
    from cryosparc.dataset import NUMPY_FORMAT, Dataset

    write_stack(tmp_path / "s.mrcs", np.zeros((2, 8, 8)))
    cs = tmp_path / "P1_J3_particles.cs"
    Dataset([("uid", np.array([1, 2], dtype=np.uint64)),
             ("blob/path", np.array([">s.mrcs", ">s.mrcs"], dtype=object)),
             ("blob/idx", np.array([0, 1], dtype=np.uint32)),
             ("ctf/df1_A", np.array([1e4, 1e4], dtype=np.float32))]).save(cs, format=NUMPY_FORMAT)
    msg = run_import(capsys, cs, tmp_path / "t.star")
    assert msg.startswith("has no alignments3D/pose field; drgnflow needs consensus poses")


def test_odd_box(tmp_path, capsys):
    star, _ = small_dataset(tmp_path, box=7)
    msg = run_import(capsys, star, tmp_path / "t.star")
    assert "box size 7 (stack stacks/s0.mrcs) is odd; drgnflow needs an even box" in msg


def test_non_square_box(tmp_path, capsys):
    star, _ = small_dataset(tmp_path, shape=(8, 6))
    msg = run_import(capsys, star, tmp_path / "t.star")
    assert "stack stacks/s0.mrcs holds 8×6 images; drgnflow needs square images" in msg


def test_nan_pixels_with_check_nan(tmp_path, capsys):
    star, images = small_dataset(tmp_path, counts=(4,))
    images[2, 3, 3] = np.nan
    write_stack(tmp_path / "stacks" / "s0.mrcs", images, 2.0)
    msg = run_import(capsys, star, tmp_path / "t.star", "--check-nan")
    assert msg == "1 problems: row 2: image 000003@stacks/s0.mrcs contains NaN or infinite pixels"
    # Without the flag the images are not read, so the import goes through.
    assert main(["import", str(star), "-o", str(tmp_path / "ok.star")]) == 0


def test_star_without_ctf(tmp_path, capsys):
    rng = np.random.default_rng(1)
    write_stack(tmp_path / "s.mrcs", np.zeros((3, 8, 8)))
    parts = default_particles([f"{i}@s.mrcs" for i in (1, 2, 3)], rng)
    for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
        del parts[c]
    star = tmp_path / "noctf.star"
    star.write_text(star_text(parts, default_optics()))
    msg = run_import(capsys, star, tmp_path / "t.star")
    assert "has no CTF columns rlnDefocusU, rlnDefocusV, rlnDefocusAngle" in msg


def test_unknown_optics_group(tmp_path, capsys):
    rng = np.random.default_rng(2)
    write_stack(tmp_path / "s.mrcs", np.zeros((3, 8, 8)))
    parts = default_particles([f"{i}@s.mrcs" for i in (1, 2, 3)], rng)
    parts["rlnOpticsGroup"] = [1, 3, 1]
    star = tmp_path / "og.star"
    star.write_text(star_text(parts, default_optics()))
    msg = run_import(capsys, star, tmp_path / "t.star")
    assert "row 1: optics group 3 is not defined in data_optics (it defines 1)" in msg


def test_zero_index_in_image_name(tmp_path, capsys):
    star, _ = small_dataset(tmp_path)
    edit_star(star, "000001@stacks/s0.mrcs", "000000@stacks/s0.mrcs")
    msg = run_import(capsys, star, tmp_path / "t.star")
    assert "row 0: rlnImageName 000000@stacks/s0.mrcs: image numbers in N@stack start at 1" in msg


def test_star_without_poses(tmp_path, capsys):
    rng = np.random.default_rng(3)
    write_stack(tmp_path / "s.mrcs", np.zeros((2, 8, 8)))
    parts = default_particles(["1@s.mrcs", "2@s.mrcs"], rng)
    del parts["rlnAngleTilt"]
    star = tmp_path / "extract.star"
    star.write_text(star_text(parts, default_optics()))
    msg = run_import(capsys, star, tmp_path / "t.star")
    assert "has no pose columns rlnAngleTilt; drgnflow needs consensus poses" in msg


def test_every_problem_in_one_message(tmp_path, capsys):
    star, _ = small_dataset(tmp_path)
    edit_star(star, "000001@stacks/s0.mrcs", "000000@stacks/s0.mrcs")
    edit_star(star, "000002@stacks/s1.mrcs", "000002@stacks/gone.mrcs")
    edit_star(star, "_rlnImagePixelSize #6\n", "")
    text = star.read_text().replace(" 2.0 8 2\n", " 8 2\n")  # drop the pixel size value too
    star.write_text(text)
    msg = run_import(capsys, star, tmp_path / "t.star")
    assert msg.startswith("3 problems: ")
    assert "data_optics has no rlnImagePixelSize; give the pixel size with --apix" in msg
    assert "image numbers in N@stack start at 1" in msg
    assert "stack stacks/gone.mrcs not found" in msg


def test_relion30_without_pixel_size_needs_apix(tmp_path, capsys):
    rng = np.random.default_rng(4)
    write_stack(tmp_path / "s.mrcs", np.zeros((2, 8, 8)))
    parts = default_particles(["1@s.mrcs", "2@s.mrcs"], rng)
    del parts["rlnOpticsGroup"]
    parts |= {"rlnVoltage": [300, 300], "rlnSphericalAberration": [2.7, 2.7],
              "rlnAmplitudeContrast": [0.1, 0.1]}
    star = tmp_path / "r30.star"
    star.write_text(star_text(parts))
    msg = run_import(capsys, star, tmp_path / "t.star")
    assert "does not give the pixel size" in msg and "--apix" in msg
    assert main(["import", str(star), "-o", str(tmp_path / "ok.star"), "--apix", "1.5"]) == 0


@pytest.mark.parametrize("name", ["particles.mrcs", "particles.csv"])
def test_unknown_file_type(tmp_path, capsys, name):
    inp = tmp_path / name
    inp.write_text("x\n")
    msg = run_import(capsys, inp, tmp_path / "t.star")
    assert msg == (f"unknown particle file type '{inp.suffix}'; drgn import reads RELION .star, "
                   "cryoSPARC .cs and .txt stack lists")


def test_box_option_checked(tmp_path, capsys):
    star, _ = small_dataset(tmp_path)
    msg = run_import(capsys, star, tmp_path / "t.star", "--box", "16")
    assert "--box 16 but the stacks hold 8×8 images" in msg


def test_output_may_not_be_the_input(tmp_path, capsys):
    star, _ = small_dataset(tmp_path)
    before = star.read_text()
    assert main(["import", str(star), "-o", str(star)]) == 2
    assert "refusing to overwrite it" in capsys.readouterr().err
    assert star.read_text() == before
