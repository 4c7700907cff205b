"""`drgn import` overrides (--apix --kv --cs --amp-contrast --phase-shift), RELION 3.0 pixel sizes from
magnification × detector pixel, and `.mrc`-named stacks (issue 12, deliverable 2)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_io import FIXTURE

from drgn_core.cli import main
from drgn_core.importing import import_particles


def run_fail(capsys, inp: Path, out: Path, *extra: str) -> str:
    """`drgn import` fails with one line (exit 2, nothing written); the message after the file name."""
    rc = main(["import", str(inp), "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if "error" in ln]
    assert len(lines) == 1, err
    return lines[0].removeprefix(f"drgn import: error: {inp}: ")


def relion30_copy(tmp: Path, drop: tuple[str, ...] = (), stack_suffix: str = ".mrcs") -> Path:
    """The fixture's RELION 3.0 STAR (and its stacks) in `tmp`, with columns dropped and the stacks
    renamed to `stack_suffix`."""
    lines = (FIXTURE / "particles_relion30.star").read_text().splitlines()
    labels = [ln.split()[0][1:] for ln in lines if ln.startswith("_rln")]
    keep = [i for i, c in enumerate(labels) if c not in drop]
    out, k = [], 0
    for ln in lines:
        if ln.startswith("_rln"):
            if labels[k] not in drop:
                out.append(f"_{labels[k]} #{len([o for o in out if o.startswith('_rln')]) + 1}")
            k += 1
        elif "@" in ln:
            words = ln.split()
            out.append(" ".join(words[i] for i in keep).replace(".mrcs", stack_suffix))
        else:
            out.append(ln)
    (tmp / "stacks").mkdir(exist_ok=True)
    for name in ("part_a", "part_b"):
        shutil.copy(FIXTURE / "stacks" / f"{name}.mrcs", tmp / "stacks" / f"{name}{stack_suffix}")
    star = tmp / "Parameters.star"
    star.write_text("\n".join(out) + "\n")
    return star


def assert_same_table(a, b) -> None:
    """Same particles, poses, shifts, CTF per particle, images and optics values."""
    assert len(a) == len(b) and a.box == b.box and a.apix == pytest.approx(b.apix)
    np.testing.assert_allclose(a.poses(), b.poses(), atol=1e-6)
    np.testing.assert_allclose(a.shifts_A(), b.shifts_A(), atol=2e-3)  # 3.0 stores px with 6 decimals
    np.testing.assert_allclose(a.ctf_params(), b.ctf_params(), atol=1e-6)
    np.testing.assert_array_equal(a.stack_indices(), b.stack_indices())
    np.testing.assert_array_equal([Path(p).stem for p in a.stack_paths()],
                                  [Path(p).stem for p in b.stack_paths()])
    np.testing.assert_array_equal(a.image_signs(), b.image_signs())


def test_relion30_magnification_and_mrc_stacks_give_the_relion31_table(tmp_path):
    star = relion30_copy(tmp_path, stack_suffix=".mrc")
    t = import_particles(star)
    # 3.0 µm detector pixel at magnification 10,000 → 3.0 Å/px, and the .mrc stacks are read as stacks.
    assert t.apix == pytest.approx(3.0) and t.box == 48
    assert {Path(p).name for p in t.stack_paths()} == {"part_a.mrc", "part_b.mrc"}
    assert_same_table(t, import_particles(FIXTURE / "particles_relion31.star"))


def test_missing_amplitude_contrast_names_column_and_option(tmp_path, capsys):
    star = relion30_copy(tmp_path, drop=("rlnAmplitudeContrast",))
    msg = run_fail(capsys, star, tmp_path / "t.star")
    assert msg == "1 problems: has no rlnAmplitudeContrast; give the amplitude contrast with --amp-contrast"
    assert not re.search(r"\bnan\b", msg, re.IGNORECASE)
    # Supplied: every particle gets it (both optics groups, which differ in kV and Cs, stay apart).
    t = import_particles(star, amp_contrast=0.1)
    assert (t.ctf_params()[:, 6] == 0.1).all()
    truth = np.load(FIXTURE / "truth.npz")
    np.testing.assert_array_equal(t.particles["rlnOpticsGroup"].to_numpy(), truth["optics_group"])


@pytest.mark.parametrize("column,option,name", [
    ("rlnVoltage", "--kv", "voltage"), ("rlnSphericalAberration", "--cs", "Cs"),
    ("rlnDetectorPixelSize", "--apix", "pixel size")])
def test_every_missing_optics_column_names_its_option(tmp_path, capsys, column, option, name):
    star = relion30_copy(tmp_path, drop=(column,))
    msg = run_fail(capsys, star, tmp_path / "t.star")
    assert option in msg and "nan" not in msg.lower()
    if column != "rlnDetectorPixelSize":
        assert msg == f"1 problems: has no {column}; give the {name} with {option}"


@pytest.mark.parametrize("source", ["particles_relion31.star", "particles_relion30.star", "particles.cs"])
def test_overrides_replace_the_files_values(tmp_path, source):
    t = import_particles(FIXTURE / source, apix=2.5, kv=200, cs=0.01, amp_contrast=0.2, phase_shift=90)
    ctf = t.ctf_params()
    assert t.apix == 2.5
    np.testing.assert_array_equal(ctf[:, 4:8], np.tile([200, 0.01, 0.2, 90], (len(t), 1)))
    assert (t.optics["rlnVoltage"] == 200).all() and (t.optics["rlnImagePixelSize"] == 2.5).all()
    truth = np.load(FIXTURE / "truth.npz")
    np.testing.assert_allclose(ctf[:, 1], truth["defocus_u"], atol=0.01)  # the rest is the file's
    assert t.provenance["override_amp_contrast"] == "0.2" and t.provenance["override_kv"] == "200"


def test_override_flags_on_the_command_line(tmp_path, capsys):
    from drgn_core.io.table import read_table

    star = relion30_copy(tmp_path, drop=("rlnAmplitudeContrast", "rlnVoltage"))
    out = tmp_path / "t.star"
    assert main(["import", str(star), "-o", str(out), "--amp-contrast", "0.07", "--kv", "300"]) == 0
    ctf = read_table(out).ctf_params()
    assert (ctf[:, 6] == 0.07).all() and (ctf[:, 4] == 300).all()
    msg = run_fail(capsys, star, tmp_path / "u.star", "--amp-contrast", "1.5", "--kv", "300")
    assert msg == "--amp-contrast must be in [0, 1) (amplitude contrast (fraction, e.g. 0.1)), got 1.5"


def _import_options(config: dict) -> str:
    """Run common.smk's get_import_options (plain Python inside the Snakefile) on `config`."""
    import shlex

    text = (Path(__file__).resolve().parents[1] / "workflow" / "rules" / "common.smk").read_text()
    from drgn_core.config_check import uses_abinit
    from drgn_core.fetch import workflow as empiar_mode

    scope = {"config": config, "shlex": shlex, "empiar_mode": empiar_mode,
             "EMPIAR": config["input"]["mode"] == "empiar", "ABINIT": uses_abinit(config)}
    for name in ("get_second_file", "get_import_options"):
        start = text.index(f"def {name}")
        exec(text[start:text.index("\ndef ", start + 1)], scope)
    return scope["get_import_options"]()


def test_workflow_config_keys_become_import_flags(tmp_path):
    """The `input:` keys pass the schema and reach `drgn import` as its flags."""
    from drgn_core.config_check import validate_config

    (tmp_path / "p.star").write_text("")
    config = {"input": {"mode": "star", "path": "p.star", "amp_contrast": 0.1, "kv": 300, "cs": 2.7,
                        "phase_shift": 90, "apix": 1.31}}
    validate_config(config, base=tmp_path)
    flags = _import_options(config).split()
    assert flags == ["--apix", "1.31", "--kv", "300", "--cs", "2.7", "--amp-contrast", "0.1",
                     "--phase-shift", "90"]
    args = __import__("argparse").ArgumentParser()
    from drgn_core.commands import import_

    import_.add_arguments(args)
    ns = args.parse_args(["x.star", "-o", "t.star", *flags])
    assert (ns.apix, ns.kv, ns.cs, ns.amp_contrast, ns.phase_shift) == (1.31, 300, 2.7, 0.1, 90)


def test_workflow_config_second_files(tmp_path):
    """input.poses / input.ctf / input.allow_pickle become --poses / --ctf / --allow-pickle; a pickle
    without allow_pickle is refused by the config check."""
    from drgn_core.config_check import validate_config
    from drgn_core.errors import InputError

    for name in ("p.star", "poses.pkl", "my ctf.pkl"):
        (tmp_path / name).write_text("")
    config = {"input": {"mode": "star", "path": "p.star", "poses": "poses.pkl", "ctf": "my ctf.pkl"}}
    with pytest.raises(InputError, match=r"key 'input\.poses': poses\.pkl is a cryoDRGN pickle; set "
                                         "input.allow_pickle: true to read it"):
        validate_config(config, base=tmp_path)
    config = {"input": {"mode": "star", "path": "p.star", "poses": "poses.pkl", "ctf": "my ctf.pkl",
                        "allow_pickle": True}}
    validate_config(config, base=tmp_path)
    assert _import_options(config) == "--poses poses.pkl --ctf 'my ctf.pkl' --allow-pickle"


def test_cs_without_amplitude_contrast_names_the_option(tmp_path, capsys):
    from numpy.lib import recfunctions

    cs = recfunctions.drop_fields(np.load(FIXTURE / "particles.cs"), "ctf/amp_contrast", usemask=False)
    shutil.copytree(FIXTURE / "stacks", tmp_path / "stacks")
    path = tmp_path / "particles.cs"
    with open(path, "wb") as f:
        np.save(f, cs)
    msg = run_fail(capsys, path, tmp_path / "t.star")
    assert msg == "1 problems: has no ctf/amp_contrast field; give the amplitude contrast with --amp-contrast"
    t = import_particles(path, amp_contrast=0.07)
    assert (t.ctf_params()[:, 6] == 0.07).all()
