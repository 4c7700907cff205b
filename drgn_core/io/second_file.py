"""Poses and CTF from a second file: ``drgn import CTF_TABLE --poses POSES --ctf CTF_PKL``.

The paper's consensus poses come apart from the CTF table: as a cryoSPARC `.cs` of a refinement, as a
RELION STAR, or as cryoDRGN's ``poses.pkl`` / ``ctf.pkl``; and cryoDRGN users describe their particles
by a `.txt` list of stacks, which holds images only. This module reads the poses of any of those files,
matches their rows to the particle table's, and replaces the table's poses (and, from a ``ctf.pkl``, its
CTF and optics groups).

Rows are matched **by uid** when both files carry cryoSPARC uids (a `.cs` table and a `.cs` of poses),
else **by order** (row i of the poses file is row i of the table: what cryoDRGN assumes). Either way the
two files must hold the same number of particles; a mismatch is refused with both counts, since a
subset matched by order would silently pair the wrong poses with the images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from drgn_core.errors import InputError
from drgn_core.io.table import CTF_PARTICLE_COLUMNS, POSE_COLUMNS, SHIFT_COLUMNS, ParticleTable
from drgn_core.pose import matrix_to_euler, rotvec_to_matrix

POSE_SUFFIXES = (".cs", ".star", ".pkl")


@dataclass
class PoseSource:
    """Poses read from a second file, in its row order."""

    path: Path
    euler: np.ndarray                     # (N, 3) RELION rot, tilt, psi in degrees
    shifts: np.ndarray                    # (N, 2) RELION origins; Å, or a fraction of the box (`fraction`)
    fraction: bool = False                # shifts are a fraction of the box (cryoDRGN poses.pkl)
    uids: np.ndarray | None = None        # (N,) uint64 cryoSPARC uids, when the file has them
    kind: str = ""

    def __len__(self) -> int:
        return len(self.euler)


def read_pose_source(path: str | os.PathLike, allow_pickle: bool = False,
                     apix: float | None = None) -> PoseSource:
    """The poses in a `.cs`, a RELION STAR or a cryoDRGN ``poses.pkl``.

    `apix` converts origins given in pixels where the file itself does not give a pixel size.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file (--poses)", path)
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        from drgn_core.io.pickles import read_poses_pkl

        rot, trans = read_poses_pkl(path, allow_pickle)
        return PoseSource(path, matrix_to_euler(rot), trans, fraction=True, kind="cryoDRGN poses.pkl")
    if suffix in (".cs", ".star"):
        src = _cs_poses(path, apix) if suffix == ".cs" else _star_poses(path, apix)
        values = np.column_stack([src.euler, src.shifts]) if len(src) else np.zeros((0, 5))
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if len(bad):
            more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
            raise InputError(f"row {int(bad[0])}: the pose or shift is NaN or infinite{more}", path)
        return src
    raise InputError(f"unknown poses file type '{path.suffix}'; --poses reads a cryoSPARC .cs, a RELION "
                     ".star or a cryoDRGN poses.pkl", path)


def _cs_poses(path: Path, apix: float | None) -> PoseSource:
    from drgn_core.io.cs import load_dataset

    d = load_dataset(path)
    fields = set(d.fields())
    if "alignments3D/pose" not in fields:
        raise InputError("has no alignments3D/pose field; --poses needs the particles of a 3D refinement",
                         path)
    n = len(d)
    rotvec = np.asarray(d["alignments3D/pose"], dtype=np.float64).reshape(n, -1)
    bad = np.flatnonzero(~np.isfinite(rotvec).all(axis=1)) if rotvec.shape[1] == 3 else [0]
    if len(bad):
        raise InputError(f"row {int(bad[0])}: alignments3D/pose is not a finite rotation vector", path)
    euler = matrix_to_euler(rotvec_to_matrix(rotvec))
    shift_px = (np.asarray(d["alignments3D/shift"], dtype=np.float64).reshape(n, 2)
                if "alignments3D/shift" in fields else np.zeros((n, 2)))
    for f in ("alignments3D/psize_A", "blob/psize_A"):
        if f in fields:
            psize = np.asarray(d[f], dtype=np.float64)
            break
    else:
        if apix is None and shift_px.any():
            raise InputError("has no alignments3D/psize_A or blob/psize_A field to convert its shifts to Å; "
                             "give the pixel size with --apix", path)
        psize = np.full(n, apix or 1.0)
    uids = np.asarray(d["uid"], dtype=np.uint64) if "uid" in fields else None
    return PoseSource(path, euler, shift_px * psize[:, None], uids=uids, kind="cryoSPARC .cs")


def _star_poses(path: Path, apix: float | None) -> PoseSource:
    from drgn_core.io.star import check_numeric
    from drgn_core.io.star_format import read_star_blocks

    blocks = read_star_blocks(path)
    particles = blocks.get("particles")
    if not isinstance(particles, pd.DataFrame):
        particles = next((b for b in blocks.values() if isinstance(b, pd.DataFrame)
                          and set(POSE_COLUMNS) <= set(b.columns)), None)
    if particles is None or not set(POSE_COLUMNS) <= set(particles.columns):
        raise InputError(f"has no loop with the pose columns {', '.join(POSE_COLUMNS)}; --poses needs the "
                         "particles of a 3D refinement", path)
    particles = particles.copy()
    problems: list[str] = []
    check_numeric(particles, [*POSE_COLUMNS, *SHIFT_COLUMNS, "rlnOriginX", "rlnOriginY"], problems)
    if problems:
        raise InputError("; ".join(problems), path)
    euler = particles[POSE_COLUMNS].to_numpy(dtype=np.float64)
    n = len(particles)
    if set(SHIFT_COLUMNS) <= set(particles.columns):
        shifts = particles[SHIFT_COLUMNS].to_numpy(dtype=np.float64)
    elif {"rlnOriginX", "rlnOriginY"} <= set(particles.columns):
        px = _star_pixel_size(blocks, particles, apix)
        if px is None:
            raise InputError("gives origins in pixels (rlnOriginX/Y) but no pixel size; give it with --apix",
                             path)
        px = np.broadcast_to(np.asarray(px, dtype=np.float64), (n,))
        shifts = particles[["rlnOriginX", "rlnOriginY"]].to_numpy(dtype=np.float64) * px[:, None]
    else:
        shifts = np.zeros((n, 2))  # RELION's meaning of absent origins
    return PoseSource(path, euler, shifts, kind="RELION STAR")


def _star_pixel_size(blocks: dict, particles: pd.DataFrame, apix: float | None) -> np.ndarray | float | None:
    """Pixel size per particle for pixel origins: the file's (3.1 optics, 3.0 columns), else `apix`."""
    optics = blocks.get("optics")
    if isinstance(optics, pd.DataFrame) and "rlnImagePixelSize" in optics and "rlnOpticsGroup" in particles:
        lut = dict(zip(optics["rlnOpticsGroup"], optics["rlnImagePixelSize"]))
        return particles["rlnOpticsGroup"].map(lut).to_numpy(dtype=np.float64)
    if "rlnImagePixelSize" in particles:
        return particles["rlnImagePixelSize"].to_numpy(dtype=np.float64)
    if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(particles.columns):
        return (particles["rlnDetectorPixelSize"].to_numpy(dtype=np.float64) * 1e4
                / particles["rlnMagnification"].to_numpy(dtype=np.float64))
    return apix


def match_rows(table: ParticleTable, src: PoseSource, table_path: Path) -> tuple[np.ndarray, str]:
    """(row of `src` for each table row, "uid" or "order"). Refuses any count mismatch."""
    n, m = len(table), len(src)
    if n != m:
        raise InputError(f"the poses file {src.path} holds {m} particles but {table_path.name} holds {n}; "
                         "they must describe the same particles (rows are matched by order, or by uid "
                         "when both files have cryoSPARC uids)", table_path)
    uids = table.uids()
    if uids is not None and src.uids is not None:
        order = pd.Index(src.uids).get_indexer(uids)
        if len(np.unique(src.uids)) != m:
            raise InputError("has repeated uids; they cannot match the particles", src.path)
        missing = np.flatnonzero(order < 0)
        if len(missing):
            raise InputError(f"{len(missing)} particles of {table_path.name} have no uid in the poses file "
                             f"{src.path} (first: row {int(missing[0])}, uid {int(uids[missing[0]])})",
                             table_path)
        return order, "uid"
    return np.arange(n), "order"


def apply_poses(table: ParticleTable, src: PoseSource, order: np.ndarray, box: int, apix: float) -> None:
    """Replace the table's poses and origins (Å) by `src`'s rows `order`."""
    p = table.particles
    euler = src.euler[order]
    shifts = src.shifts[order] * (box * apix if src.fraction else 1.0)
    for k, c in enumerate(POSE_COLUMNS):
        p[c] = euler[:, k]
    for k, c in enumerate(SHIFT_COLUMNS):
        p[c] = shifts[:, k]
    for c in ("rlnOriginX", "rlnOriginY"):  # RELION 3.0 pixel origins would contradict the new ones
        if c in p:
            del p[c]
    # Where each particle's poses came from, so `drgn export` can write the subset of the poses file (a
    # cryoSPARC .cs keeps its uids: refinement there needs them) beside the subset of the particle file.
    p["drgnPosesRow"] = np.asarray(order, dtype=np.int64)
    if src.uids is not None:
        p["drgnPosesUid"] = [str(int(u)) for u in np.asarray(src.uids)[order]]


def apply_ctf_pkl(table: ParticleTable, ctf: np.ndarray, path: Path, overrides: dict[str, float],
                  box: int | None) -> None:
    """Replace the table's CTF and optics groups by a cryoDRGN ``ctf.pkl``'s rows (matched by order).

    The pixel size is the pickle's, scaled to the stacks' box where it was made for another box (cryoDRGN
    records the box D it was parsed for); `overrides` win over the pickle's values.
    """
    from drgn_core.io.star import number_optics_groups

    n = len(table)
    if len(ctf) != n:
        raise InputError(f"holds CTF parameters for {len(ctf)} particles but the particle table holds {n}; "
                         "rows are matched by order", path)
    apix = ctf[:, 1] * (ctf[:, 0] / box if box else 1.0)
    p = table.particles
    p["rlnDefocusU"], p["rlnDefocusV"], p["rlnDefocusAngle"] = ctf[:, 2], ctf[:, 3], ctf[:, 4]
    p["rlnPhaseShift"] = overrides.get("rlnPhaseShift", ctf[:, 8])
    keys = pd.DataFrame({"rlnVoltage": ctf[:, 5], "rlnSphericalAberration": ctf[:, 6],
                         "rlnAmplitudeContrast": ctf[:, 7], "rlnImagePixelSize": np.round(apix, 6)})
    for c, v in overrides.items():
        if c in keys:
            keys[c] = v
    group = number_optics_groups(keys)
    first = pd.Series(np.arange(n)).groupby(group).first().to_numpy()
    optics = keys.iloc[first].reset_index(drop=True)
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1))
    optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in range(1, len(optics) + 1)])
    optics["rlnImageSize"] = box or 0
    optics["rlnImageDimensionality"] = 2
    p["rlnOpticsGroup"] = group
    for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnDetectorPixelSize",
              "rlnMagnification", "rlnImagePixelSize"):  # RELION 3.0 per-particle optics: now the pickle's
        if c in p:
            del p[c]
    table.optics = optics


def table_from_stacklist(path: Path) -> ParticleTable:
    """A particle table of a `.txt` stack list: images only (poses and CTF NaN until filled)."""
    from drgn_core.io.stacklist import read_stacklist

    sl = read_stacklist(path)
    stacks, index = sl.locate()
    n = sl.n
    names = pd.Series(index + 1).astype(str).str.zfill(6) + "@" + pd.Series(stacks, dtype="str")
    particles = pd.DataFrame({"rlnImageName": names.astype("str")})
    for c in [*POSE_COLUMNS, *SHIFT_COLUMNS, *CTF_PARTICLE_COLUMNS]:
        particles[c] = np.nan
    particles["rlnPhaseShift"] = 0.0
    particles["rlnOpticsGroup"] = 1
    particles["drgnStackPath"] = stacks
    particles["drgnStackIndex"] = index.astype(np.int64)
    particles["drgnImageSign"] = np.ones(n, dtype=np.int64)
    particles["drgnSourceRow"] = np.arange(n, dtype=np.int64)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnVoltage": [np.nan], "rlnSphericalAberration": [np.nan],
                           "rlnAmplitudeContrast": [np.nan], "rlnImagePixelSize": [sl.apix],
                           "rlnImageSize": [sl.box], "rlnImageDimensionality": [2]})
    return ParticleTable(particles, optics, None, {"source_path": str(path.absolute()),
                                                   "source_format": "txt"})


def stack_box(table: ParticleTable) -> int | None:
    """The box of the table's images: from the first readable stack's header, else the optics block."""
    from drgn_core.io.mrc import read_stack_header

    for sp in pd.unique(table.particles["drgnStackPath"].astype(str))[:1]:
        if os.path.isfile(sp):
            try:
                return int(read_stack_header(sp)[2])
            except InputError:
                pass
    sizes = table.optics["rlnImageSize"].to_numpy()
    return int(sizes[0]) if len(sizes) and sizes[0] else None
