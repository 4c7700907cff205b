"""Volume series and what users ask of them: latent values in, `.mrc` files (with their z) out.

This module holds no model code. It reads latent values from the command line or files
(`parse_z_values`, `read_z_file`), low-pass filters and flips the hand (`lowpass`, `flip_hand`), and writes
`vol_000.mrc`, `vol_001.mrc`, … with the voxel size, plus `z_values.txt` (row i = the z of volume i) and
`maps.png`, a contact sheet of the series (central slices and projections of every map)
(`write_volume_series`). Decoding is `drgn_core.rundir.write_volumes`, which calls these functions and is
what `drgn volumes`, `drgn analyze` and `drgn traverse` use; `backproject` uses `lowpass` for its maps.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from drgn_core.errors import DrgnError, InputError
from drgn_core.io.atomic import atomic_path
from drgn_core.io.mrc import write_mrc


def volume_name(prefix: str, i: int, m: int) -> str:
    """`prefix_007.mrc`: zero-padded to three digits, or more when there are over a thousand volumes."""
    return f"{prefix}_{i:0{max(3, len(str(m - 1)))}d}.mrc"


def sheet_name(prefix: str) -> str:
    """The contact sheet beside a series: `maps.png`, or `prefix_maps.png` (as for z_values.txt)."""
    return "maps.png" if prefix == "vol" else f"{prefix}_maps.png"


def write_volume_series(vols: np.ndarray, z: np.ndarray | None, outdir: str | os.PathLike, apix: float,
                        prefix: str = "vol", picture: bool = True) -> list[Path]:
    """Write vols (m, D, D, D) as outdir/prefix_000.mrc … and z (m, zdim) as outdir/z_values.txt.

    With `picture`, a contact sheet of the series (`plots.volume_sheet`: central slices and projections,
    one row per map) is written beside the maps as `maps.png`, so whoever opens the folder — the report,
    or a user of `drgn volumes`, `drgn analyze` or `drgn traverse` — sees the maps without a 3-D viewer.

    Each file is written atomically; z_values.txt goes last, so a complete series always has it.
    Stale files `prefix_NNN.mrc` from an earlier, longer series in the same folder are removed, so the
    folder never mixes two series. Returns the volume paths. With `prefix` other than 'vol', the latent
    file is `prefix_z_values.txt`, so several series can share a folder.
    """
    vols = np.asarray(vols)
    if vols.ndim == 3:
        vols = vols[None]
    m = len(vols)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, v in enumerate(vols):
        p = out / volume_name(prefix, i, m)
        write_mrc(p, v.astype(np.float32), apix)
        paths.append(p)
    keep = {p.name for p in paths}
    pattern = re.compile(rf"{re.escape(prefix)}_\d{{3,}}\.mrc")
    for old in out.iterdir():
        if pattern.fullmatch(old.name) and old.name not in keep:
            old.unlink()
    if picture:
        from drgn_core.plots import volume_sheet

        D = vols.shape[-1]
        volume_sheet(vols, out / sheet_name(prefix), names=[p.stem for p in paths],
                     title=f"{out.name}: {m} map{'s' if m != 1 else ''}, D = {D}, {apix:.3g} Å/voxel")
    zz = np.zeros((m, 0)) if z is None else np.asarray(z, dtype=np.float64).reshape(m, -1)
    name = "z_values.txt" if prefix == "vol" else f"{prefix}_z_values.txt"
    with atomic_path(out / name) as tmp:
        with open(tmp, "w") as f:
            f.write(f"# latent value of each volume ({prefix}_NNN.mrc is row NNN); zdim = {zz.shape[1]}\n")
            for row in zz:
                f.write(" ".join(f"{x:.8g}" for x in row) + "\n")
    return paths


def lowpass(vol: np.ndarray, apix: float, resolution_A: float, edge_px: float = 2.0) -> np.ndarray:
    """Low-pass filter a volume to `resolution_A` with a raised-cosine edge `edge_px` shells wide.

    Frequencies below 1/resolution pass unchanged; the soft edge avoids the ringing of a hard cutoff.
    """
    from drgn_core.fourier import fft3_center, ifft3_center, radius_3d

    D = vol.shape[-1]
    if resolution_A < 2 * apix:
        raise DrgnError(f"--lowpass {resolution_A} Å is finer than Nyquist, {2 * apix:.3g} Å")
    r_cut = D * apix / resolution_A  # cutoff radius in Fourier voxels
    r = radius_3d(D)
    w = np.clip((r_cut + edge_px / 2 - r) / edge_px, 0.0, 1.0)
    w = 0.5 - 0.5 * np.cos(np.pi * w)
    return ifft3_center(fft3_center(vol) * w).real.astype(np.float32)


def flip_hand(vol: np.ndarray) -> np.ndarray:
    """The mirror image (z → -z about the box centre), for maps whose consensus poses had the wrong hand."""
    out = np.empty_like(vol)
    out[..., 1:, :, :] = vol[..., 1:, :, :][..., ::-1, :, :]  # index i ↔ D - i keeps the centre (D/2) fixed
    out[..., 0, :, :] = vol[..., 0, :, :]
    return out


def parse_z_values(values: list[str] | None, z_file: str | os.PathLike | None, zdim: int) -> np.ndarray:
    """Latent points (m, zdim) from `--z` strings and/or a .txt/.npy file.

    `--z` takes numbers separated by commas or spaces; consecutive groups of zdim numbers are one point,
    so `--z 0.1,0.5` gives two points of a 1-D model or one point of a 2-D model. It may be repeated.
    """
    pts: list[np.ndarray] = []
    if values:
        nums = []
        for v in values:
            for tok in re.split(r"[,\s]+", v.strip()):
                if tok:
                    try:
                        nums.append(float(tok))
                    except ValueError:
                        raise DrgnError(f"--z: {tok!r} is not a number") from None
        if zdim == 0 or len(nums) % zdim:
            raise DrgnError(f"--z gave {len(nums)} numbers; the model's zdim is {zdim}: give a multiple")
        pts.append(np.asarray(nums).reshape(-1, zdim))
    if z_file is not None:
        pts.append(read_z_file(z_file, zdim))
    if not pts:
        raise DrgnError("give latent values with --z or --z-file")
    out = np.concatenate(pts).astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise DrgnError("latent values must be finite numbers")
    return out


def read_z_file(path: str | os.PathLike, zdim: int) -> np.ndarray:
    """(m, zdim) from a .npy array or a whitespace-separated text file (one point per line, # comments)."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file", p)
    try:
        z = np.load(p, allow_pickle=False) if p.suffix == ".npy" else np.loadtxt(p, ndmin=2, comments="#")
    except (ValueError, OSError) as e:
        raise InputError(f"cannot read latent values ({type(e).__name__}: {e})", p) from None
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1 and zdim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[1] != zdim:
        raise InputError(f"holds an array of shape {z.shape}; the model needs (m, {zdim})", p)
    if len(z) == 0:
        raise InputError("holds no latent values", p)
    return z
