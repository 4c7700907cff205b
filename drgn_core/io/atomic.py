"""Write outputs so that a failed or killed command leaves nothing half-written.

Every command writes through these helpers: the data goes to a temporary name in the destination folder
and is renamed into place only when complete (rename is atomic on one file system). Inputs are never
opened for writing; `refuse_overwrite_input` guards the case where a user points an output at an input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from drgn_core.errors import DrgnError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DrgnError("exists; refusing to overwrite it (choose another output or remove it)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should follow the user's umask
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole, on error it is removed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DrgnError("exists; refusing to overwrite it (choose another output or remove it)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_overwrite_input(outputs: list[str | os.PathLike], inputs: list[str | os.PathLike]) -> None:
    """Raise if any output path is one of the inputs (resolved), so a typo never destroys user data."""
    ins = {Path(p).resolve() for p in inputs if p}
    for o in outputs:
        if o and Path(o).resolve() in ins:
            raise DrgnError("is an input of this command; refusing to overwrite it", o)
