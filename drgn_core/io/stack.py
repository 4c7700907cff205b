"""Our own particle stacks, ``particles.{D}.mrcs``, and the JSON sidecar that says what they are.

Row i of such a stack is row i of the canonical table (docs/architecture.md § Stacks per box size), already
sign-corrected and downsampled. The MRC header alone cannot say which table a stack belongs to, nor the
original box and pixel size it came from, so `drgn downsample` writes ``particles.{D}.json`` beside it:

    {"D": 128, "apix": 2.13, "D0": 256, "apix0": 1.065, "n": 10000, "dtype": "float32",
     "table": "/abs/table.star", "table_sha256": "…"}

`open_stack` checks the sidecar against the MRC header, so a stack replaced by hand (or a sidecar left
over from another run) is caught before training on mismatched data.

When the table's optics groups differ in pixel size or box, `drgn downsample` resamples each onto the
common grid and the sidecar also lists what it did per group (`drgn_core.downsample.plan_resampling`):

    "groups": [{"optics_group": 1, "apix0": 1.24, "D0": 256, "window": 256, "scale": 0.5,
                "apix": 2.48, "residual": 0.0, "n": 5000}, …], "extent_A": 317.44

"apix" is then the one pixel size of every image in the stack, and D0/apix0 are the largest group's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError
from drgn_core.io.table import ParticleTable

SIDECAR_KEYS = ("D", "apix", "D0", "apix0", "n", "dtype", "table", "table_sha256")


@dataclass
class ParticleStack:
    """An opened ``particles.{D}.mrcs``: rows aligned with the canonical table."""

    path: Path
    D: int
    apix: float
    D0: int
    apix0: float
    n: int
    dtype: str
    images: np.ndarray            # read-only memory map (n, D, D)
    table: str | None = None      # the table the stack was made from (absolute path), when known
    table_sha256: str | None = None
    groups: list[dict] | None = None  # per optics group resampling, when the groups differed (see above)

    def __len__(self) -> int:
        return self.n


def sidecar_path(stack_path: str | os.PathLike) -> Path:
    """``particles.128.mrcs`` → ``particles.128.json`` (the suffix replaced, whatever it is)."""
    p = Path(stack_path)
    return p.with_suffix(".json")


def file_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks (tables of 10⁶ particles are ~100 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def sidecar_dict(D: int, apix: float, D0: int, apix0: float, n: int, dtype: str,
                 table_path: str | os.PathLike | None) -> dict:
    """The sidecar's content for a stack made from the table at `table_path`."""
    tp = Path(table_path).absolute() if table_path is not None else None
    return {"D": int(D), "apix": float(apix), "D0": int(D0), "apix0": float(apix0), "n": int(n),
            "dtype": str(np.dtype(dtype)), "table": str(tp) if tp else None,
            "table_sha256": file_sha256(tp) if tp is not None and tp.is_file() else None}


def write_sidecar(path: str | os.PathLike, meta: dict) -> None:
    """Write a sidecar JSON atomically."""
    from drgn_core.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")


def _read_sidecar(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read stack sidecar ({type(e).__name__}: {e})", path) from None
    missing = [k for k in SIDECAR_KEYS if k not in meta] if isinstance(meta, dict) else list(SIDECAR_KEYS)
    if missing:
        raise InputError(f"stack sidecar lacks {', '.join(missing)}; re-create the stack with "
                         "drgn downsample", path)
    return meta


def open_stack(path: str | os.PathLike, table: ParticleTable | None = None) -> ParticleStack:
    """Open a stack written by `drgn downsample` (or `drgn simulate`), checking it is what it claims.

    With a sidecar, its D, n and dtype must match the MRC header. Without one, `table` supplies the box
    and pixel size, and the stack must hold len(table) images of the table's box. When `table` is given,
    the stack must have as many rows as the table and come from images of the table's box.
    """
    from drgn_core.io.mrc import read_mrc

    path = Path(path)
    # The sidecar (or the table) is authoritative for the pixel size; MRC headers are often wrong.
    data, _ = read_mrc(path, mmap=True)
    if data.ndim == 2:
        data = data[None]
    n, ny, nx = data.shape
    if ny != nx:
        raise InputError(f"holds {ny}×{nx} images; particle stacks must be square", path)
    side = sidecar_path(path)
    if side.is_file():
        meta = _read_sidecar(side)
        problems = []
        if int(meta["D"]) != nx:
            problems.append(f"sidecar {side.name} says D={meta['D']} but the stack holds {ny}×{nx} images")
        if int(meta["n"]) != n:
            problems.append(f"sidecar {side.name} says n={meta['n']} but the stack holds {n} images")
        if np.dtype(meta["dtype"]) != data.dtype:
            problems.append(f"sidecar {side.name} says dtype {meta['dtype']} but the stack holds "
                            f"{data.dtype}")
        if problems:
            raise InputError("; ".join(problems) + "; re-create it with drgn downsample", path)
        stack = ParticleStack(path, nx, float(meta["apix"]), int(meta["D0"]), float(meta["apix0"]), n,
                              str(data.dtype), data, meta["table"], meta["table_sha256"], meta.get("groups"))
    elif table is not None:
        if nx != table.box:
            raise InputError(f"has no sidecar {side.name} and its box {nx} differs from the particle table's "
                             f"{table.box}; make the stack with drgn downsample", path)
        stack = ParticleStack(path, nx, table.apix, table.box, table.apix, n, str(data.dtype), data,
                              str(table.path) if table.path else None, None)
    else:
        raise InputError(f"has no sidecar {side.name} (written by drgn downsample beside the stack), so its "
                         "pixel size and origin are unknown; pass the particle table too", path)
    if table is not None:
        _check_against_table(stack, table)
    return stack


def _check_against_table(stack: ParticleStack, table: ParticleTable) -> None:
    problems = []
    if stack.n != len(table):
        problems.append(f"holds {stack.n} images but the particle table has {len(table)} rows")
    o = table.optics
    used = set(np.unique(table.particles["rlnOpticsGroup"].to_numpy()).tolist())
    table_groups = {int(g): (float(a), int(d)) for g, a, d in
                    zip(o["rlnOpticsGroup"], o["rlnImagePixelSize"], o["rlnImageSize"]) if g in used}
    kinds = {(round(a, 6), d) for a, d in table_groups.values()}
    if stack.groups is not None or len(kinds) > 1:
        for rec in stack.groups or []:
            a, d = table_groups.get(int(rec["optics_group"]), (np.nan, -1))
            if d != int(rec["D0"]) or not abs(a - float(rec["apix0"])) <= 1e-4 * float(rec["apix0"]):
                problems.append(f"was made from optics group {rec['optics_group']} at {rec['apix0']:g} Å/px, "
                                f"{rec['D0']} px, but the particle table says "
                                + (f"{a:g} Å/px, {d} px" if d >= 0 else "no such group"))
        if stack.groups is None:
            problems.append("was made from one pixel size and box, but the particle table's optics groups "
                            "differ in them")
    else:
        (apix0, D0), = kinds or {(stack.apix0, stack.D0)}
        if stack.D0 != D0:
            problems.append(f"was made from {stack.D0}-pixel images but the particle table's box is {D0}")
        if abs(stack.apix0 - apix0) > 1e-4 * apix0:
            problems.append(f"was made from images of {stack.apix0} Å/px but the particle table says "
                            f"{apix0} Å/px")
    if problems:
        raise InputError("; ".join(problems) + "; re-create it with drgn downsample from this table",
                         stack.path)
