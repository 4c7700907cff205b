"""MRC / MRCS files: memory-mapped reading, float32/float16 writing with voxel size.

mrcfile does the format work (modes 0, 1, 2, 6, 12, extended headers, 64-bit offsets through numpy memory
maps); this module adds drgnflow's rules: errors that name the file, NaN checks where asked, volumes with
origin 0 and the voxel size set, stacks marked as image stacks.
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np

from drgn_core.errors import InputError
from drgn_core.io.atomic import atomic_path

SUPPORTED_MODES = {0, 1, 2, 6, 12}


def _label(m) -> None:
    """Replace mrcfile's creation-time label with a fixed one, so a seeded output is byte-identical."""
    from drgn_core import __version__

    m.header.label[0] = f"{'Created by drgnflow':40s}{__version__:>39s} "


def _open(path: str | os.PathLike, mmap: bool):
    path = Path(path)
    if not path.exists():
        raise InputError("no such file", path)
    try:
        if mmap:
            return mrcfile.mmap(path, mode="r", permissive=True)
        return mrcfile.open(path, mode="r", permissive=True)
    except Exception as e:
        raise InputError(f"cannot read as MRC ({type(e).__name__}: {e})", path) from None


def read_stack_header(path: str | os.PathLike) -> tuple[int, int, int, float, int]:
    """(n_images, ny, nx, apix, mode) from the header alone; a volume (nz > 1) counts as nz images."""
    with _open(path, mmap=True) as m:
        if m.data is None:
            raise InputError("MRC header is invalid or the data block is truncated", path)
        mode = int(m.header.mode)
        if mode not in SUPPORTED_MODES:
            raise InputError(f"MRC mode {mode} is not supported (supported: 0, 1, 2, 6, 12)", path)
        shape = m.data.shape
        n = 1 if len(shape) == 2 else int(shape[0])
        return n, int(shape[-2]), int(shape[-1]), float(m.voxel_size.x), mode


def read_mrc(path: str | os.PathLike, mmap: bool = True) -> tuple[np.ndarray, float]:
    """(data, apix). With mmap=True the data is a read-only memory map: slice it, don't copy it whole.

    2D files come back as (ny, nx); stacks and volumes as (n, ny, nx).
    """
    m = _open(path, mmap=mmap)
    if m.data is None:
        m.close()
        raise InputError("MRC header is invalid or the data block is truncated", path)
    mode = int(m.header.mode)
    if mode not in SUPPORTED_MODES:
        m.close()
        raise InputError(f"MRC mode {mode} is not supported (supported: 0, 1, 2, 6, 12)", path)
    apix = float(m.voxel_size.x)
    data = m.data if mmap else np.array(m.data)
    # For memory maps, mrcfile keeps the file open as long as `data` is referenced; not closing `m` here
    # is deliberate (closing would invalidate the map).
    if not mmap:
        m.close()
    return data, apix


def write_mrc(path: str | os.PathLike, data: np.ndarray, apix: float, dtype=np.float32,
              stack: bool = False, overwrite: bool = True) -> None:
    """Write a 2D image, a 3D volume, or (stack=True) a 3D image stack, atomically, with voxel size.

    dtype float32 (mode 2) or float16 (mode 12).
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"write_mrc writes float32 or float16, not {dtype}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(np.ascontiguousarray(data, dtype=dtype))
            if stack:
                m.set_image_stack()
            else:
                m.set_volume() if np.ndim(data) == 3 else None
            m.voxel_size = apix
            m.header.origin = (0.0, 0.0, 0.0)
            _label(m)


def new_mmap_stack(path: str | os.PathLike, n: int, D: int, apix: float, dtype=np.float32):
    """Create an (n, D, D) image stack on disk and return the open mrcfile object for filling in chunks.

    The caller writes `m.data[i:j] = chunk` and then `m.close()`; used for stacks larger than RAM.
    """
    m = mrcfile.new_mmap(path, shape=(n, D, D), mrc_mode=12 if np.dtype(dtype) == np.float16 else 2,
                         overwrite=True)
    m.set_image_stack()
    m.voxel_size = apix
    _label(m)
    return m
