"""Index files: 0-based rows of the canonical particle table, as `.npy` int64 with a `.txt` twin.

docs/architecture.md § Indices: every index file drgnflow reads or writes holds rows of the dataset's
canonical table, never rows of a previous subset, so users never remap indices. One reader for every command,
strict by default: anything that is not a non-empty 1-D set of distinct integers in range is refused with one
line naming the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError
from drgn_core.io.atomic import atomic_path


def read_index_file(path: str | os.PathLike, n_rows: int | None = None,
                    allow_duplicates: bool = False, allow_empty: bool = False,
                    allow_pickle: bool = False) -> np.ndarray:
    """Read an index file (.npy of integers, or a .txt of integers) of 0-based canonical table rows.

    Refuses anything that is not a non-empty 1-D set of distinct integers within [0, n_rows): floats,
    booleans, pickled objects, duplicates and out-of-range rows each get a one-line message naming the file.
    `allow_duplicates` is for readers where a repeated row has a meaning (encoding rows in a given order);
    `allow_empty` for files where "no rows" is a valid answer (a filter that removed nothing, a run
    without held-out particles). Negative rows are refused even when `n_rows` is not known.
    `allow_pickle` admits cryoDRGN's ``*.pkl`` index files (an int array or a list of numpy ints, maybe
    unsorted), read by `drgn_core.io.pickles.read_index_pkl`'s restricted unpickler; the order is kept.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such index file", path)
    if path.suffix == ".pkl":
        from drgn_core.io.pickles import read_index_pkl

        arr = read_index_pkl(path, allow_pickle)
    elif path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise InputError(f"cannot read as a numeric .npy index file ({e})", path) from None
        except OSError as e:
            raise InputError(f"cannot read as a .npy file ({e})", path) from None
    else:
        tokens = path.read_text().split()
        try:
            arr = np.array([int(t) for t in tokens], dtype=np.int64)
        except ValueError:
            bad = next(t for t in tokens if not re.fullmatch(r"[+-]?\d+", t))
            raise InputError(f"holds {bad!r}, not an integer row index (one 0-based table row per line)",
                             path) from None
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"holds {arr.dtype} values; expected integer row indices (0-based rows of the "
                         "canonical table)", path)
    if arr.ndim != 1:
        if arr.ndim == 2 and 1 in arr.shape:
            arr = arr.ravel()
        else:
            raise InputError(f"holds an array of shape {arr.shape}; expected a 1-D list of row indices", path)
    arr = arr.astype(np.int64)
    if arr.size == 0:
        if allow_empty:
            return arr
        raise InputError("holds no indices; nothing to select", path)
    if n_rows is None and arr.min() < 0:
        raise InputError(f"index {int(arr.min())} is negative: rows are 0-based rows of the canonical table",
                         path)
    if n_rows is not None and (arr.min() < 0 or arr.max() >= n_rows):
        bad = arr[(arr < 0) | (arr >= n_rows)]
        more = f"; {bad.size} indices are out of range" if bad.size > 1 else ""
        raise InputError(f"index {int(bad[0])} is out of range: the table has {n_rows} rows "
                         f"(0 … {n_rows - 1}){more}", path)
    uniq, counts = np.unique(arr, return_counts=True)
    if not allow_duplicates and (counts > 1).any():
        raise InputError(f"index {int(uniq[counts > 1][0])} appears {int(counts.max())} times; "
                         "each row may be selected once", path)
    return arr


def write_index_files(indices: np.ndarray, npy_path: str | os.PathLike) -> None:
    """Write `indices` as int64 .npy and its .txt twin (one row per line), atomically.

    The one writer of index files: run directories, filter and traversal outputs, k-means centres and
    exports all go through it, so every index file drgnflow writes reads back with `read_index_file`.
    """
    npy_path = Path(npy_path)
    idx = np.asarray(indices, dtype=np.int64)
    with atomic_path(npy_path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, idx, allow_pickle=False)
    with atomic_path(npy_path.with_suffix(".txt")) as tmp:
        tmp.write_text("".join(f"{i}\n" for i in idx))
