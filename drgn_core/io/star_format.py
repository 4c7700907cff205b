"""The STAR file format itself: data blocks in, data blocks out, with no knowledge of particle tables.

`read_star_blocks` and `write_star` are what the RELION importer (`drgn_core.io.star`) and the canonical
table (`drgn_core.io.table`) build on; keeping them free of both is what lets those two import this
module without importing each other.

Reading: only block and loop headers are scanned in Python; each loop's rows go to pandas' C parser in
one call. Malformed files get an `InputError` naming the file and the line: a column declared twice, a
data row with more or fewer values than the loop declares (EMPIAR-10028's particle STAR has a stray
``9`` on one row), a line that is neither a label nor data. bench/import_star.py measures this reader
against the `starfile` package on a 10⁶-row STAR (figures in bench/README.md): ours is the faster, so
it stays.

Writing formats columns with Arrow's C++ kernels instead of pandas ``to_csv`` (≈10× faster at 10⁶
rows; bench/import_star.py measures it against ``starfile.write``): floats are rounded to 6 decimals and
printed in shortest form, strings containing whitespace (or empty) are double-quoted so the file still
splits on whitespace.
"""

from __future__ import annotations

import io
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

from drgn_core.errors import InputError

# Columns that stay strings even where every value looks like a number.
STRING_COLUMNS = ["rlnImageName", "rlnMicrographName", "rlnOpticsGroupName", "drgnStackPath", "drgnUid",
                  "drgnPosesUid"]

_BLOCK_LINE = re.compile(rb"[ \t]*data_(\S*)[ \t]*\r?")


class _StarSyntaxError(ValueError):
    """A problem at a byte offset of the file (turned into 'line N: …' by the caller)."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


def _line_of(text: bytes, offset: int) -> int:
    """1-based line number of a byte offset (error paths only: it scans the text up to there)."""
    return text.count(b"\n", 0, offset) + 1


def _block_starts(text: bytes) -> list[tuple[str, int, int]]:
    """(name, start of the 'data_' line, end of it) for every line that is exactly ``data_NAME``.

    bytes.find runs at memchr speed; a regex anchored at every line start of a 100 MB file is ~10×
    slower. A data row that merely contains 'data_' is not a block start (the whole line must match).
    """
    out = []
    pos = 0
    while (hit := text.find(b"data_", pos)) >= 0:
        line_start = text.rfind(b"\n", 0, hit) + 1
        line_end = text.find(b"\n", hit)
        line_end = len(text) if line_end < 0 else line_end
        m = _BLOCK_LINE.fullmatch(text, line_start, line_end)
        if m:
            out.append((m.group(1).decode(errors="replace"), line_start, line_end))
        pos = line_end
    return out


def read_star_blocks(path: str | os.PathLike, strings: list[str] | None = None
                     ) -> dict[str, pd.DataFrame | dict]:
    """All data blocks of a STAR file: name → DataFrame for loops, dict for key-value blocks.

    Columns in `strings` (default `STRING_COLUMNS`: image names, paths, uids) stay strings; the others
    are numeric wherever every value parses as a number. Any malformation raises an `InputError` naming
    the file and, where there is one, the line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror})", path) from None
    starts = _block_starts(text)
    if not starts:
        raise InputError("holds no data_ blocks; is it a STAR file?", path)
    keep_str = set(STRING_COLUMNS if strings is None else strings)
    blocks: dict[str, pd.DataFrame | dict] = {}
    for i, (name, _, header_end) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else len(text)
        if name in blocks:
            raise InputError(f"line {_line_of(text, header_end)}: data_{name} appears twice", path)
        try:
            blocks[name] = _parse_block(text, header_end, end, keep_str)
        except _StarSyntaxError as e:
            raise InputError(f"line {_line_of(text, e.offset)} (data_{name}): {e}", path) from None
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError, MemoryError) as e:
            raise InputError(f"cannot parse data_{name} as STAR ({type(e).__name__}: {e})", path) from None
    return blocks


def _next_line(text: bytes, pos: int, end: int) -> tuple[bytes, int]:
    """(stripped line starting at pos, position after it)."""
    nl = text.find(b"\n", pos, end)
    nl = end if nl < 0 else nl
    return text[pos:nl].strip(), nl + 1


def _words(line: bytes, offset: int) -> list[str]:
    """The whitespace-separated values of a line, honouring double quotes."""
    s = line.decode()
    if '"' not in s and "'" not in s:
        return s.split()
    try:
        return shlex.split(s, comments=True)
    except ValueError as e:
        raise _StarSyntaxError(f"{e} in {s[:60]!r}", offset) from None


def _parse_block(text: bytes, pos: int, end: int, keep_str: set[str]) -> pd.DataFrame | dict:
    """One data block between byte offsets: a loop → DataFrame, else key-value pairs → dict."""
    pairs: dict[str, object] = {}
    where: dict[str, int] = {}
    while pos < end:
        line, nxt = _next_line(text, pos, end)
        if not line or line.startswith(b"#"):
            pos = nxt
            continue
        if line.startswith(b"loop_"):
            if pairs:
                raise _StarSyntaxError("a loop_ follows key-value pairs in the same block", pos)
            return _parse_loop(text, nxt, end, keep_str)
        if line.startswith(b"_"):
            words = _words(line.split(b"#", 1)[0] if b'"' not in line else line, pos)
            key = words[0][1:]
            if key in pairs:
                first = _line_of(text, where[key])
                raise _StarSyntaxError(f"_{key} appears twice (first on line {first})", pos)
            if len(words) > 2:
                raise _StarSyntaxError(f"_{key} has {len(words) - 1} values; a key takes one", pos)
            v = words[1] if len(words) > 1 else ""
            pairs[key] = v if key in keep_str else _number_or_string(v)
            where[key] = pos
            pos = nxt
            continue
        raise _StarSyntaxError(f"unexpected line {line[:60].decode(errors='replace')!r}", pos)
    return pairs


def _number_or_string(v: str) -> object:
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def _parse_loop(text: bytes, pos: int, end: int, keep_str: set[str]) -> pd.DataFrame:
    labels: list[str] = []
    label_at: dict[str, int] = {}
    while pos < end:
        line, nxt = _next_line(text, pos, end)
        if line.startswith(b"_"):
            label = line.split()[0][1:].decode(errors="replace")
            if label in label_at:
                raise _StarSyntaxError(f"column _{label} is declared twice (first on line "
                                       f"{_line_of(text, label_at[label])})", pos)
            labels.append(label)
            label_at[label] = pos
        elif line and not line.startswith(b"#"):
            break
        pos = nxt
    if not labels:
        raise _StarSyntaxError("loop_ declares no columns", pos)
    body = text[pos:end]
    if not body.strip():
        return pd.DataFrame({c: pd.Series([], dtype="str" if c in keep_str else "float64") for c in labels})
    try:
        df = pd.read_csv(io.BytesIO(body), sep=r"\s+", header=None, comment="#", engine="c", quotechar='"',
                         keep_default_na=False, na_values=["nan", "NaN", "<NA>"],
                         dtype={i: str for i, c in enumerate(labels) if c in keep_str})
    except pd.errors.ParserError:
        _find_bad_row(text, pos, end, len(labels))
        raise
    last = df.iloc[:, -1]
    padded = last.isna().any() or (not pd.api.types.is_numeric_dtype(last) and (last == "").any())
    if df.shape[1] != len(labels) or padded:
        # Too few values on every row, or an empty or NaN last value: a short row that pandas padded (or
        # a real "nan" or ""). Find the short row, if any (only on this path: it reads the rows in Python).
        _find_bad_row(text, pos, end, len(labels))
        if df.shape[1] != len(labels):
            raise _StarSyntaxError(f"rows hold {df.shape[1]} values but the loop declares {len(labels)} "
                                   "columns", pos)
    df.columns = labels
    return df


def _find_bad_row(text: bytes, pos: int, end: int, n_labels: int) -> None:
    """Raise for the first data row whose number of values is not `n_labels`."""
    while pos < end:
        line, nxt = _next_line(text, pos, end)
        if line and not line.startswith(b"#"):
            n = len(_words(line.split(b"#", 1)[0] if b'"' not in line else line, pos))
            if n != n_labels:
                shown = line[:80].decode(errors="replace")
                raise _StarSyntaxError(f"data row holds {n} values but the loop declares {n_labels} columns "
                                       f"({shown!r}{'…' if len(line) > 80 else ''})", pos)
        pos = nxt


# ---- writing ---------------------------------------------------------------------------------------
def _column_strings(values: pd.Series, decimals: int):
    """One column as an Arrow string array, STAR-formatted."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pd.api.types.is_bool_dtype(values):
        values = values.astype(np.int8)
    if pd.api.types.is_float_dtype(values):
        arr = pa.array(np.round(values.to_numpy(dtype=np.float64), decimals), from_pandas=False)
        return pc.cast(arr, pa.large_string())
    if pd.api.types.is_integer_dtype(values):
        return pc.cast(pa.array(values.to_numpy()), pa.large_string())
    arr = pa.array(values.astype(object).where(values.notna(), "").astype(str).to_numpy(dtype=object),
                   type=pa.large_string())
    needs_quotes = pc.match_substring_regex(arr, r"\s|^$")
    if pc.any(needs_quotes).as_py():
        quote, empty = pa.scalar('"', pa.large_string()), pa.scalar("", pa.large_string())
        arr = pc.if_else(needs_quotes, pc.binary_join_element_wise(quote, arr, quote, empty), arr)
    return arr


def _write_loop(f, name: str, df: pd.DataFrame, decimals: int, batch: int = 200_000) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    space, newline = pa.scalar(" ", pa.large_string()), pa.scalar("\n", pa.large_string())
    empty = pa.scalar("", pa.large_string())
    f.write(f"\n# version 30001\n\ndata_{name}\n\nloop_\n".encode())
    for i, c in enumerate(df.columns):
        f.write(f"_{c} #{i + 1}\n".encode())
    for start in range(0, len(df), batch):
        part = df.iloc[start:start + batch]
        cols = [_column_strings(part[c], decimals) for c in part.columns]
        line = pc.binary_join_element_wise(*cols, space)
        line = pc.binary_join_element_wise(line, empty, newline)
        _, offsets_buf, data_buf = line.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64, count=len(line) + 1, offset=line.offset * 8)
        f.write(memoryview(data_buf)[offsets[0]:offsets[-1]])
    f.write(b"\n")


def write_star(blocks: dict[str, pd.DataFrame], path: str | os.PathLike, decimals: int = 6) -> None:
    """Write loop blocks (name → DataFrame) as a STAR file, atomically, fast at millions of rows."""
    from drgn_core.io.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for name, df in blocks.items():
            _write_loop(f, name, df, decimals)

