"""Output safety (nothing half-written, inputs never overwritten) and the CLI's promises to users."""

from __future__ import annotations

import subprocess
import sys

import pytest

from drgn_core.cli import COMMANDS, build_parser, main
from drgn_core.errors import DrgnError
from drgn_core.io.atomic import atomic_dir, atomic_path, refuse_overwrite_input


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_and_dir_publish_on_success(tmp_path):
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("done")
    assert (tmp_path / "a.txt").read_text() == "done"
    with atomic_dir(tmp_path / "d") as d:
        (d / "x").write_text("1")
    with atomic_dir(tmp_path / "d") as d:  # replacing an existing folder swaps it whole
        (d / "y").write_text("2")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]


def test_refuse_overwrite(tmp_path):
    (tmp_path / "in.star").write_text("x")
    with pytest.raises(DrgnError, match="refusing to overwrite"):
        atomic_path(tmp_path / "in.star", overwrite=False).__enter__()
    with pytest.raises(DrgnError, match="is an input of this command"):
        refuse_overwrite_input([tmp_path / "in.star"], [str(tmp_path / "." / "in.star")])


def test_every_command_is_registered_and_has_an_example():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [name for name, _ in COMMANDS if name not in sub.choices]
    assert not missing, f"commands without a module: {missing}"
    for name, p in sub.choices.items():
        assert "drgn " + name in (p.description or ""), f"`drgn {name} --help` shows no example"


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 1
    assert "usage: drgn" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "drgn_core.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("drgnflow ")


def test_outputs_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "y").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
