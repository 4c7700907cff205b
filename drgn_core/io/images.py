"""Reading the ORIGINAL particle images of a table: by rows, or streamed in table order.

Images live in the user's stacks (often thousands of them, one per micrograph). Reads are grouped by
stack, each stack is memory-mapped (never loaded whole), and the table's drgnImageSign is applied so
protein is bright whatever the source (docs/architecture.md § Images and contrast). Memory is bounded by the
number of rows asked for: `iter_image_chunks` holds one chunk at a time, and at most `max_open` stacks stay
mapped (each map holds a file descriptor; a dataset with 10⁴ stacks would otherwise exhaust the process's
limit).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import pandas as pd

from drgn_core.errors import InputError
from drgn_core.io.table import ParticleTable


class ImageSource:
    """Random and sequential access to a table's original images (float32, sign applied).

    Build one per table when reading many times: it resolves stack paths once.
    """

    def __init__(self, table: ParticleTable, max_open: int = 64):
        self.table = table
        paths = table.stack_paths()
        self.codes, uniq = pd.factorize(pd.Series(paths, dtype=object), sort=False)
        self.paths = [str(p) for p in uniq]
        self.indices = table.stack_indices()
        self.signs = table.image_signs().astype(np.float32)
        # Optics groups may differ in box (merged sessions): each row has its group's box, each stack the
        # box of its first row; `read` serves rows of one box at a time.
        self.boxes = table.box_sizes()
        sizes = np.unique(self.boxes)
        self.box = int(sizes[0]) if len(sizes) == 1 else None
        _, first = np.unique(self.codes, return_index=True)  # codes are 0..len(paths)-1, in order
        self._stack_box = self.boxes[first]
        self.max_open = max_open
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.indices)

    def _stack(self, code: int) -> np.ndarray:
        """Memory map (n, ny, nx) of stack `code`, keeping the most recently used ones open."""
        from drgn_core.io.mrc import read_mrc

        if code in self._open:
            self._open.move_to_end(code)
            return self._open[code]
        data, _ = read_mrc(self.paths[code], mmap=True)
        if data.ndim == 2:
            data = data[None]
        box = int(self._stack_box[code])
        if data.shape[-2:] != (box, box):
            raise InputError(f"holds {data.shape[-2]}×{data.shape[-1]} images but the particle table says "
                             f"{box}×{box}", self.paths[code])
        self._open[code] = data
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return data

    def _read_from(self, code: int, idx: np.ndarray, out: np.ndarray) -> None:
        """Images `idx` (0-based, any order) of one stack into `out` (len(idx), D, D)."""
        data = self._stack(code)
        if idx.size and (idx.min() < 0 or idx.max() >= len(data)):
            raise InputError(f"holds {len(data)} images but the particle table asks for index "
                             f"{int(idx.max()) if idx.max() >= len(data) else int(idx.min())}",
                             self.paths[code])
        if idx.size > 1 and np.all(np.diff(idx) == 1):
            out[:] = data[idx[0]:idx[-1] + 1]  # contiguous run: one sequential read
        else:
            order = np.argsort(idx, kind="stable")
            out[order] = data[idx[order]]  # sorted fancy indexing touches each page once

    def read(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), D0, D0) images of table `rows`, in the order given, sign applied.

        The rows must share one box D0 (always so unless optics groups differ in box)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = len(self)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise InputError(f"row out of range: the table has {n} rows, asked for "
                             f"{rows.min()}..{rows.max()}", self.table.path)
        box = self.box
        if box is None:
            sizes = np.unique(self.boxes[rows])
            if len(sizes) > 1:
                raise ValueError(f"rows of optics groups with different boxes {sizes.tolist()} cannot share "
                                 "one array; read them group by group")
            box = int(sizes[0]) if len(sizes) else 0
        out = np.empty((len(rows), box, box), dtype=np.float32)
        codes = self.codes[rows]
        if rows.size and np.all(codes == codes[0]):
            self._read_from(int(codes[0]), self.indices[rows], out)
        else:
            order = np.argsort(codes, kind="stable")
            bounds = np.flatnonzero(np.diff(codes[order])) + 1
            for group in np.split(order, bounds):
                buf = np.empty((len(group), box, box), dtype=np.float32)
                self._read_from(int(codes[group[0]]), self.indices[rows[group]], buf)
                out[group] = buf
        out *= self.signs[rows][:, None, None]
        return out

    def chunks(self, chunk_size: int = 1000, rows: np.ndarray | None = None
               ) -> Iterator[tuple[int, np.ndarray]]:
        """(position of the chunk's first row in `rows`, images) over `rows` (default all) in order."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        rows = np.arange(len(self), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        for start in range(0, len(rows), chunk_size):
            yield start, self.read(rows[start:start + chunk_size])

    def close(self) -> None:
        self._open.clear()


def read_images(table: ParticleTable, rows: np.ndarray) -> np.ndarray:
    """float32 (n, D0, D0): the original images of table `rows`, in that order, with drgnImageSign applied."""
    src = ImageSource(table)
    try:
        return src.read(rows)
    finally:
        src.close()


def iter_image_chunks(table: ParticleTable, chunk_size: int = 1000) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (row_start, images) over the whole table in row order, `chunk_size` images at a time."""
    src = ImageSource(table)
    try:
        yield from src.chunks(chunk_size)
    finally:
        src.close()
