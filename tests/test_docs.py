"""Citations of docs/architecture.md point at sections it has, and nothing cites a file the repository lacks.

Code, tests and docs cite the conventions and data contracts as `docs/architecture.md § Section name`
(several as `§ A, § B`). A renamed or deleted section would leave those citations pointing nowhere, which
is how "DESIGN §N" references to a design file outside the repository once crept in; this test catches it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO / "docs" / "architecture.md"
SUFFIXES = {".py", ".md", ".smk", ".yaml", ".rst", ".sh", ".toml"}


def _tracked_text_files() -> list[Path]:
    """The repository's own source and doc files (git's list when there is one, else a walk)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=60).stdout.split("\n")
        files = [REPO / f for f in out if f]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "results", ".snakemake", "__pycache__"}
        files = [p for p in REPO.rglob("*") if not skip & set(p.relative_to(REPO).parts)]
    this = Path(__file__).resolve()  # this file quotes the patterns it looks for
    return [p for p in files if p.suffix in SUFFIXES and p.is_file() and p.resolve() != this]


def _flat(text: str) -> str:
    """Text with line breaks (and the comment marks after them) turned into spaces: citations may wrap."""
    return re.sub(r"[ \t]*\n[ \t]*(?:#+[ \t]*)?", " ", text)


def headings() -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#{2,4} (.+)$", ARCHITECTURE.read_text(), re.M)]


def test_every_section_citation_names_an_existing_heading():
    names = sorted(headings(), key=len, reverse=True)  # longest first: "Conventions" vs longer names
    assert len(names) == len(set(names)), "architecture.md headings must be unique to be cited by name"
    cited, broken = 0, []
    for path in _tracked_text_files():
        text = _flat(path.read_text(errors="replace"))
        for m in re.finditer(r"§ ", text):
            rest = text[m.end():]
            if not any(rest.startswith(n) for n in names):
                broken.append(f"{path.relative_to(REPO)}: § {rest[:40]!r}")
            cited += 1
    assert broken == []
    assert cited >= 30  # the conventions are cited throughout drgn_core, tests and docs


def test_nothing_cites_the_old_design_notes():
    offenders = [str(p.relative_to(REPO)) for p in _tracked_text_files()
                 if re.search(r"DESIGN(\.md| §)", p.read_text(errors="replace"))]
    assert offenders == []


def test_the_headings_code_relies_on_exist():
    expected = {"Conventions", "Images and contrast", "Fourier transforms", "Poses", "Shifts", "CTF",
                "Pixel size", "Indices", "MRC files", "cryoSPARC files", "Data contracts between stages",
                "Canonical particle table", "Stacks per box size", "Run directory of drgn train", "Volumes",
                "Workflow logs and benchmarks", "Data path and scale", "Metrics on simulated data"}
    assert expected <= set(headings())
