"""Where particle stacks are: resolving the stack paths that users' metadata names, and `.txt` stack lists.

RELION and cryoSPARC record stack paths relative to their *project* folder, which is rarely the folder the
STAR or `.cs` file sits in, and users move projects around. The rule here, the same for every format:

1. absolute paths are used as they are (or, when missing, as ``datadir/basename``);
2. with ``datadir``: ``datadir/path``, then ``datadir/basename`` (a flat folder of stacks), then for a
   cryoSPARC-imported name ``<digits>_original.mrcs`` ``datadir/original.mrcs`` (by the user's file name);
3. ``base/path``, where base is the folder of the metadata file.

The first candidate that exists wins. Each distinct path is resolved once (a million-particle STAR names a
few thousand stacks), and a path that resolves nowhere is reported with every place that was tried.

A `.txt` stack list (one stack per line, relative to the list) describes a particle set as the
concatenation of its stacks; `read_stacklist` turns it into per-particle (stack, index) locations.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError, collect

_IMPORTED_NAME = re.compile(r"\d{6,}_(.+)")


def candidate_paths(ref: str, base: Path, datadir: Path | None) -> list[Path]:
    """The places a stack named `ref` in a metadata file in folder `base` may be, in order of preference."""
    p = Path(ref)
    name = Path(p.name)
    if p.is_absolute():
        return [p] + ([datadir / name] if datadir is not None else [])
    out: list[Path] = []
    if datadir is not None:
        out += [datadir / p, datadir / name]
        # cryoSPARC's import jobs store stacks as J1/imported/<long number>_<original name>: a .cs from
        # the authors' project names those; the user's copy carries the original name.
        m = _IMPORTED_NAME.fullmatch(name.name)
        if m:
            out.append(datadir / m.group(1))
    out.append(base / p)
    # Deduplicate while keeping order (datadir may equal base, ref may be a bare name).
    seen: set[str] = set()
    unique = []
    for c in out:
        key = os.path.normpath(str(c))
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def resolve_stack_paths(refs: list[str], base: Path, datadir: Path | None
                        ) -> tuple[list[str | None], dict[str, list[Path]]]:
    """Resolve each distinct stack reference once.

    Returns the absolute path (str) for each ref, or None where no candidate exists, and for the
    unresolved ones the candidates that were tried (for the error message).
    """
    base = Path(base).absolute()
    dd = Path(datadir).absolute() if datadir is not None else None
    resolved: list[str | None] = []
    tried: dict[str, list[Path]] = {}
    for ref in refs:
        cands = candidate_paths(ref, base, dd)
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            resolved.append(None)
            tried[ref] = cands
        else:
            resolved.append(os.path.normpath(str(hit.absolute())))
    return resolved, tried


def describe_missing(ref: str, tried: list[Path], rows: np.ndarray, datadir: Path | None,
                     what: str = "stack") -> str:
    """One problem line for a stack that was not found: which rows need it and where we looked."""
    first = int(rows[0])
    count = f"{len(rows)} rows, first row {first}" if len(rows) > 1 else f"row {first}"
    where = ", ".join(str(t) for t in tried)
    hint = "" if datadir is not None else "; pass --datadir with the folder the paths are relative to"
    return f"{what} {ref} not found ({count}; looked for {where}){hint}"


@dataclass
class StackList:
    """A particle set stored as the concatenation of several stacks, in list order."""

    path: Path
    paths: list[str]        # absolute stack paths, in list order
    counts: np.ndarray      # images per stack (int64)
    box: int
    apix: float

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def locate(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(stack path, 0-based index within it) of each particle row (default: all rows)."""
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        rows = np.arange(self.n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise InputError(f"row out of range: the listed stacks hold {self.n} images", self.path)
        which = np.searchsorted(starts, rows, side="right") - 1
        return np.asarray(self.paths, dtype=object)[which], rows - starts[which]


def read_stacklist(path: str | os.PathLike) -> StackList:
    """Read a `.txt` list of stacks (one path per line, relative to the list; blank lines and # comments
    ignored). Every stack must exist and hold square images of one box size; all problems are reported
    together."""
    from drgn_core.io.mrc import read_stack_header

    path = Path(path)
    if not path.is_file():
        raise InputError("no such file (expected a .txt list of particle stacks)", path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read as a text list of stacks ({type(e).__name__}: {e})", path) from None
    entries = [(i + 1, ln.strip()) for i, ln in enumerate(lines)
               if ln.strip() and not ln.strip().startswith("#")]
    if not entries:
        raise InputError("lists no stacks", path)
    problems: list[str] = []
    paths: list[str] = []
    counts: list[int] = []
    shapes: dict[tuple[int, int], list[int]] = {}
    apixes: list[float] = []
    base = path.absolute().parent
    for lineno, ref in entries:
        p = Path(ref) if Path(ref).is_absolute() else base / ref
        if not p.is_file():
            problems.append(f"line {lineno}: stack {ref} not found (looked for {p})")
            continue
        try:
            n, ny, nx, apix, _ = read_stack_header(p)
        except InputError as e:
            problems.append(f"line {lineno}: {e}")
            continue
        paths.append(os.path.normpath(str(p.absolute())))
        counts.append(n)
        shapes.setdefault((ny, nx), []).append(lineno)
        apixes.append(apix)
    if len(shapes) > 1:
        desc = ", ".join(f"{ny}×{nx} (lines {', '.join(map(str, ls[:3]))})"
                         for (ny, nx), ls in shapes.items())
        problems.append(f"stacks have different image sizes: {desc}")
    elif shapes:
        (ny, nx), = shapes
        if ny != nx:
            problems.append(f"images are {ny}×{nx}; drgnflow needs square images")
    collect(problems, path)
    (ny, _), = shapes
    return StackList(path, paths, np.asarray(counts, dtype=np.int64), int(ny), float(apixes[0]))
