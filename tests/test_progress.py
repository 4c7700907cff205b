"""The progress-bar factory (drgn_core/progress.py): plain lines in a log, a bar on a terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from drgn_core import progress
from drgn_core.progress import LogLines, progress_bar

ROOT = Path(__file__).resolve().parents[1]


def test_log_mode_prints_a_line_every_five_percent_and_no_carriage_return(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(progress, "LOG_SECONDS", 1e9)  # percent steps only, whatever the machine's speed
    with progress_bar(total=1000, desc="work", unit="img", file=log, mininterval=0) as bar:
        assert isinstance(bar, LogLines)
        for _ in range(1000):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # 0 %, then one line per 5 % step (20 of them, 100 % included), nothing else.
    assert len(lines) == 21, lines
    assert lines[0].startswith("work:   0%") and lines[-1].startswith("work: 100%")
    assert all(ln.startswith("work:") and "img" in ln for ln in lines)


def test_log_mode_time_step_and_final_line(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(progress, "LOG_SECONDS", 0.0)  # every display is due: one line per refresh
    with progress_bar(total=10**6, desc="t", file=log, mininterval=0) as bar:
        bar.update(3)
        bar.update(4)
    assert log.getvalue().count("\n") == 3 and "\r" not in log.getvalue()
    assert log.getvalue().splitlines()[-1].startswith("t:   0%|") and " 7/1000000 " in log.getvalue()


def test_a_command_logs_lines_not_a_carriage_return_stream(tmp_path):
    """`drgn simulate` with stderr redirected to a file, as in a Snakemake rule's log."""
    log = tmp_path / "log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "drgn_core.cli", "simulate", "-o", str(tmp_path / "sim"), "--n",
                        "300", "-D", "32", "--seed", "0"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                       stderr=f, stdout=subprocess.DEVNULL, check=True, timeout=300)
    text = log.read_text()
    assert "\r" not in text
    assert any(ln.startswith("simulate: render: 100%") for ln in text.splitlines()), text


def test_terminal_gets_the_usual_bar():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    with progress_bar(total=3, file=out, mininterval=0) as bar:
        bar.update(3)
    assert not isinstance(bar, LogLines) and "\r" in out.getvalue()
