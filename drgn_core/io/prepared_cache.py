"""A cache of prepared particle images on disk, for training streamed from a stack larger than memory.

Why it exists: in-memory training prepares every image once (2D transform on the half lattice, shift
undone, normalised: `drgn_core.data.Preparer`), while streaming without a cache reads and prepares every
image again in every epoch. On a machine without a spare core for the background thread that work adds to
the epoch (bench/README.md, "Training at scale"). With this cache the preparation runs once, in one
sequential pass before the first epoch, and every epoch after only reads prepared values.

Layout: `<root>/<key[:16]>/` holds
- `manifest.json`: the format, the full key and what the values were made from (stack checksum, number of
  rows, box, lattice points, dtype, normalisation scale) and the layout, for a person who finds the folder;
- `part_NNNNN.npy`: plain .npy arrays (count, P, 2) in the dtype training serves (float32 on the CPU,
  float16 on a GPU, as the in-memory mode holds them), images [i·per_part, (i+1)·per_part) of the data's
  rows in position order. Each part is written under a temporary name, synced and renamed when complete,
  so a part that exists with its exact size is complete; a killed build keeps its finished parts.

The key is a SHA-256 over everything the prepared values depend on (the caller passes those `fields`), so
a changed stack, table, row selection, normalisation or dtype gives another folder: a cache is never
served for data it was not made from. Several processes may build one cache at once (parts are renamed
into place whole; a part built twice has the same bytes).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError
from drgn_core.io.atomic import atomic_path

CACHE_FORMAT = "drgnflow-prepared-cache/1"
PART_BYTES = 256 * 2**20  # about this many bytes per part file: few files, each one long sequential write


def cache_key(fields: dict) -> str:
    """SHA-256 (hex) of the JSON of `fields` with sorted keys."""
    import hashlib

    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def array_digest(a: np.ndarray | None) -> str | None:
    """SHA-256 of an array's dtype, shape and bytes (for the key: rows, shifts, signs)."""
    if a is None:
        return None
    import hashlib

    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


class PreparedCache:
    """The prepared images (n, P, 2) of one dataset, in part files under `root`/<key[:16]>/.

    `block` is the preparation block (images transformed at once); parts hold whole blocks, so that a part
    is prepared in exactly the blocks the in-memory mode uses and its values are bit-identical to them.
    """

    def __init__(self, root: str | os.PathLike, fields: dict, n: int, P: int, dtype: np.dtype | str,
                 block: int, part_bytes: int | None = None):
        self.root = Path(root)
        self.n, self.P, self.dtype = int(n), int(P), np.dtype(dtype)
        self.fields = {**fields, "format": CACHE_FORMAT, "n": self.n, "P": self.P, "dtype": self.dtype.str}
        self.key = cache_key(self.fields)
        self.folder = self.root / self.key[:16]
        self.image_bytes = self.P * 2 * self.dtype.itemsize
        per = (part_bytes or PART_BYTES) // self.image_bytes
        self.per_part = max(block, per // block * block)
        self.n_parts = max(1, -(-self.n // self.per_part))
        self._offset: dict[int, int] = {}  # part → byte offset of its data (the .npy header's length)
        # drop the pages read from the page cache: the cache is as large as the data, read once per epoch
        # in order, so keeping its pages only pushes a memory-limited job (cgroup) into reclaim; measured
        # 8 % faster epochs under a limit of half the stack (bench/README.md)
        self.drop_pages = True

    @property
    def nbytes(self) -> int:
        return self.n * self.image_bytes

    def part_path(self, i: int) -> Path:
        return self.folder / f"part_{i:05d}.npy"

    def part_range(self, i: int) -> tuple[int, int]:
        """Positions [lo, hi) of part i."""
        return i * self.per_part, min(self.n, (i + 1) * self.per_part)

    # ---- the folder ---------------------------------------------------------------------------------
    def manifest(self) -> dict:
        return {**self.fields, "key": self.key, "images_per_part": self.per_part, "parts": self.n_parts,
                "bytes": self.nbytes}

    def open_folder(self) -> None:
        """Create the folder and its manifest; a folder of this name made for other data (a manifest with
        another key: a 64-bit prefix collision, or a damaged file) is emptied first."""
        m = self.folder / "manifest.json"
        if m.exists():
            try:
                same = json.loads(m.read_text()).get("key") == self.key
            except (OSError, ValueError):
                same = False
            if same:
                return
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(m) as tmp:
            tmp.write_text(json.dumps(self.manifest(), indent=1, sort_keys=True) + "\n")

    def remove(self) -> None:
        """Delete this cache, and `root` too when nothing else is left in it."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.root.rmdir()
        except OSError:
            pass

    def remove_others(self) -> list[Path]:
        """Delete the other caches under `root` (those with a manifest of this format); returns them.

        For a root that only this run uses (the run's own folder): a cache made for other data is never
        used again there.
        """
        gone = []
        if not self.root.is_dir():
            return gone
        for d in self.root.iterdir():
            if d == self.folder or not (d / "manifest.json").is_file():
                continue
            try:
                fmt = json.loads((d / "manifest.json").read_text()).get("format")
            except (OSError, ValueError):
                continue
            if fmt == CACHE_FORMAT:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d)
        return gone

    # ---- parts --------------------------------------------------------------------------------------
    def _check_part(self, i: int) -> bool:
        """Whether part i exists whole: a .npy of shape (count, P, 2), this dtype, and exactly its size."""
        if i in self._offset:
            return True
        path = self.part_path(i)
        lo, hi = self.part_range(i)
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read(f)
                offset = f.tell()
            size = path.stat().st_size
        except (OSError, ValueError):
            return False
        if shape != (hi - lo, self.P, 2) or fortran or dtype != self.dtype:
            return False
        if size != offset + (hi - lo) * self.image_bytes:
            return False
        self._offset[i] = offset
        return True

    def missing(self) -> list[int]:
        """Parts not (yet) complete on disk."""
        return [i for i in range(self.n_parts) if not self._check_part(i)]

    @property
    def complete(self) -> bool:
        return not self.missing()

    def write_part(self, i: int, blocks: Iterable[np.ndarray]) -> None:
        """Write part i from consecutive blocks (b, P, 2) of this dtype, atomically and synced to disk.

        The written pages are dropped from the page cache afterwards: the cache is as large as the data,
        which does not fit in memory, and is read again only in the next epoch.
        """
        lo, hi = self.part_range(i)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (hi - lo, self.P, 2)}
        with atomic_path(self.part_path(i)) as tmp:
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_1_0(f, header)
                count = 0
                for b in blocks:
                    b = np.ascontiguousarray(b)
                    if b.dtype != self.dtype or b.shape[1:] != (self.P, 2):
                        raise ValueError(f"block {b.dtype} {b.shape} for a cache of {self.dtype} "
                                         f"(n, {self.P}, 2)")
                    b.tofile(f)
                    count += len(b)
                if count != hi - lo:
                    raise ValueError(f"part {i} got {count} images, expected {hi - lo}")
                f.flush()
                os.fsync(f.fileno())
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._offset.pop(i, None)
        if not self._check_part(i):
            raise InputError(f"part {i} did not read back whole after writing", self.part_path(i))

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Prepared images of positions [lo, hi), (hi - lo, P, 2) in the cache's dtype: one sequential
        read per part the span touches, with plain file reads (nothing stays mapped in the process), its
        pages then dropped from the page cache (`drop_pages`)."""
        out = []
        for i in range(lo // self.per_part, (max(hi, lo + 1) - 1) // self.per_part + 1):
            p_lo, p_hi = self.part_range(i)
            a, b = max(lo, p_lo), min(hi, p_hi)
            if a >= b:
                continue
            if not self._check_part(i):
                raise InputError("is missing or incomplete (the prepared-image cache was changed while "
                                 "training read it)", self.part_path(i))
            count = (b - a) * self.P * 2
            with open(self.part_path(i), "rb") as f:
                start = self._offset[i] + (a - p_lo) * self.image_bytes
                f.seek(start)
                x = np.fromfile(f, dtype=self.dtype, count=count)
                if self.drop_pages and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), start, x.nbytes, os.POSIX_FADV_DONTNEED)
            if x.size != count:
                raise InputError(f"ends before position {b} (truncated?)", self.part_path(i))
            out.append(x.reshape(b - a, self.P, 2))
        if not out:
            return np.zeros((0, self.P, 2), self.dtype)
        return out[0] if len(out) == 1 else np.concatenate(out)
