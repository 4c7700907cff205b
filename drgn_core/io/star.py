"""RELION STAR files: reading users' particle STARs (RELION 3.0 and 3.1+/5) into a `ParticleTable`, and
writing plain RELION 3.1 STARs. The STAR format itself (blocks in, blocks out) is `drgn_core.io.star_format`.

RELION 3.0 keeps everything per particle in one block: optics (voltage, Cs, amplitude contrast, detector
pixel size and magnification) and origins in *pixels*. RELION 3.1 moved optics into ``data_optics`` and
origins into Ångström (``rlnOriginX/YAngst``). Both become the same canonical table
(docs/architecture.md § Canonical particle table): RELION 3.1 layout, origins in Å, one optics group per
distinct optics tuple, every original column kept.

``rlnImageName`` is ``N@stack`` with 1-based N. Parsing is vectorised (pandas string ops) and each distinct
stack path is resolved once, so a million-particle STAR imports in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from drgn_core.errors import InputError, collect
from drgn_core.io.overrides import OPTICS_OVERRIDES, missing_column
from drgn_core.io.star_format import read_star_blocks, write_star
from drgn_core.io.table import (
    CTF_PARTICLE_COLUMNS,
    OPTICS_COLUMNS,
    POSE_COLUMNS,
    SHIFT_COLUMNS,
    ParticleTable,
)

# Per-particle optics columns of RELION 3.0 files (in ``data_optics`` from 3.1 on).
OPTICS_CTF_COLUMNS = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
# RELION 3.0 columns that a RELION 3.1 particle block must not carry (they would contradict the optics
# block or the Å origins); dropped by `write_relion_star`, kept in the canonical table for the record.
LEGACY_PARTICLE_COLUMNS = {"rlnOriginX", "rlnOriginY", "rlnDetectorPixelSize", "rlnMagnification",
                           "rlnImagePixelSize", *OPTICS_CTF_COLUMNS}
NO_POSES_HINT = ("drgnflow needs consensus poses: import the particles of a 3D refinement "
                 "(e.g. Refine3D/jobNNN/run_data.star), or import these with --no-poses and find the poses "
                 "with drgn abinit (workflow: input.poses: abinit)")
NO_CTF_HINT = "drgnflow needs CTF parameters: import particles that went through CTF estimation"


# ---- small helpers shared by the readers and the importer ------------------------------------------
def format_rows(rows: np.ndarray, limit: int = 5) -> str:
    """'row 3' / 'rows 3, 7, 9' / 'rows 3, 7, 9, 10, 12 (and 40 more)': 0-based table rows."""
    rows = np.asarray(rows)
    if len(rows) == 1:
        return f"row {int(rows[0])}"
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    more = f" (and {len(rows) - limit} more)" if len(rows) > limit else ""
    return f"rows {shown}{more}"


def check_numeric(df: pd.DataFrame, columns: list[str], problems: list[str], where: str = "") -> None:
    """Coerce `columns` of `df` to float64 in place; report a column holding non-numbers with its first bad
    row. Missing columns are skipped (the caller reports those)."""
    for c in columns:
        if c not in df or pd.api.types.is_numeric_dtype(df[c]):
            continue
        num = pd.to_numeric(df[c], errors="coerce")
        bad = np.flatnonzero(num.isna().to_numpy() & df[c].notna().to_numpy())
        if len(bad):
            problems.append(f"{where}column {c} is not numeric ({format_rows(bad[:1])}: "
                            f"{df[c].iloc[bad[0]]!r})")
        df[c] = num


def number_optics_groups(keys: pd.DataFrame) -> np.ndarray:
    """1-based optics group per row: one group per distinct row of `keys`, numbered in order of first
    appearance (so group 1 is the first particle's)."""
    rounded = keys.copy()
    for c in rounded:
        if pd.api.types.is_float_dtype(rounded[c]):
            rounded[c] = rounded[c].round(6)
    return rounded.groupby(list(rounded.columns), sort=False, dropna=False).ngroup().to_numpy() + 1


# ---- reading ---------------------------------------------------------------------------------------
def parse_image_names(names: pd.Series, problems: list[str], label: str = "rlnImageName"
                      ) -> tuple[np.ndarray, pd.Series]:
    """Split ``N@stack`` names (1-based N) into 0-based indices and stack references, vectorised.

    A name without '@' is a single-image file (index 0). Rows whose number is missing, not an integer or
    below 1 get index -1 and a problem.
    """
    s = names.astype("str").str.strip()
    if not len(s):  # an empty loop (the importer says "holds no particles")
        return np.zeros(0, dtype=np.int64), s
    has_at = s.str.contains("@", regex=False).to_numpy()
    parts = s.str.partition("@")
    refs = parts[2].where(has_at, s)
    num = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce").to_numpy(dtype=np.float64)
    bad_number = ~np.isfinite(num) | (num != np.round(num))
    zero = ~bad_number & (num < 1)
    empty_ref = (refs.str.len() == 0).to_numpy()
    for mask, why in ((bad_number, "does not start with an image number N@"),
                      (zero, "image numbers in N@stack start at 1"),
                      (empty_ref, "names no stack after '@'")):
        bad = np.flatnonzero(mask)
        if len(bad):
            problems.append(f"{format_rows(bad)}: {label} {s.iloc[bad[0]]}: {why}")
    index = np.where(bad_number | zero, 0, num).astype(np.int64) - 1
    index[bad_number | zero] = -1
    return index, refs


def locate_stacks(refs: pd.Series, base: Path, datadir: Path | None, problems: list[str]
                  ) -> np.ndarray:
    """Absolute stack path for every row (each distinct reference resolved once); references found
    nowhere are reported and get their best-guess absolute path (base/ref)."""
    from drgn_core.io.stacklist import describe_missing, resolve_stack_paths

    codes, uniq = pd.factorize(refs, sort=False)
    uniq = [str(u) for u in uniq]
    resolved, tried = resolve_stack_paths(uniq, base, datadir)
    if tried:
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(uniq) + 1))
        for k, ref in enumerate(uniq):
            if resolved[k] is None:
                rows = order[bounds[k]:bounds[k + 1]]
                problems.append(describe_missing(ref, tried[ref], rows, datadir))
    fallback = [r if r is not None else os.path.normpath(str(Path(base).absolute() / u))
                for r, u in zip(resolved, uniq)]
    return np.asarray(fallback, dtype=object)[codes]


def _pick_particle_block(blocks: dict, path: Path) -> tuple[str, pd.DataFrame]:
    if "particles" in blocks and isinstance(blocks["particles"], pd.DataFrame):
        return "particles", blocks["particles"]
    for name, b in blocks.items():
        if isinstance(b, pd.DataFrame) and "rlnImageName" in b:
            return name, b
    raise InputError("has no particle block (no loop with rlnImageName); is it a RELION particle STAR?",
                     path)


def _required_missing(df: pd.DataFrame, cols: list[str]) -> list[str]:
    return [c for c in cols if c not in df]


def read_relion_star(path: str | os.PathLike, datadir: str | os.PathLike | None = None,
                     apix: float | None = None, problems: list[str] | None = None,
                     overrides: dict[str, float] | None = None, need_poses: bool = True,
                     need_ctf: bool = True) -> ParticleTable:
    """Read a RELION 3.0 or 3.1+/5 particle STAR into a canonical `ParticleTable`.

    `datadir` is where relative stack paths start (default: the STAR's folder); `apix` overrides or
    supplies the pixel size of the particle images (origins given in pixels convert with it).
    `overrides` (`drgn_core.io.overrides.make_overrides`) replaces or supplies optics values and the phase
    shift. `need_poses` / `need_ctf` false: the poses / CTF come from another file, so their columns may
    be missing here (they are then filled with NaN for the caller to replace).

    With `problems` given, problems found in the file (missing columns or stacks, bad image names,
    undefined optics groups) are appended to it and a best-effort table is returned, so an importer can
    report them together with its own checks; otherwise they are raised as one `InputError`. The optics
    groups' ``rlnImageSize`` is 0 where the file does not say (the importer fills it from the stacks).
    """
    path = Path(path)
    own = problems is None
    probs: list[str] = [] if own else problems
    over = dict(overrides or {})
    if apix is not None:
        over["rlnImagePixelSize"] = float(apix)
    blocks = read_star_blocks(path)
    _, particles = _pick_particle_block(blocks, path)
    particles = particles.copy()
    optics_in = blocks.get("optics")
    is31 = isinstance(optics_in, pd.DataFrame)  # RELION 3.1 introduced data_optics
    dd = Path(datadir) if datadir is not None else None
    if is31:
        optics = _optics_31(optics_in.copy(), particles, over, probs, need_ctf)
    else:
        optics = _optics_30(particles, over, probs, need_ctf)

    missing_pose = _required_missing(particles, POSE_COLUMNS)
    if missing_pose and need_poses:
        probs.append(f"has no pose columns {', '.join(missing_pose)}; {NO_POSES_HINT}")
    for c in missing_pose:
        particles[c] = np.nan
    missing_ctf = _required_missing(particles, CTF_PARTICLE_COLUMNS)
    if missing_ctf and need_ctf:
        probs.append(f"has no CTF columns {', '.join(missing_ctf)}; {NO_CTF_HINT}")
    for c in missing_ctf:
        particles[c] = np.nan
    check_numeric(particles, [*POSE_COLUMNS, *CTF_PARTICLE_COLUMNS, "rlnPhaseShift", "rlnCtfBfactor",
                              "rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginX", "rlnOriginY"], probs)
    if "rlnPhaseShift" in over:
        particles["rlnPhaseShift"] = over["rlnPhaseShift"]
    elif "rlnPhaseShift" not in particles:
        particles["rlnPhaseShift"] = 0.0  # RELION's meaning of an absent phase shift
    _origins_to_angstrom(particles, optics, probs)

    _locate_images(particles, path, dd, probs)
    particles["drgnSourceRow"] = np.arange(len(particles), dtype=np.int64)

    table = ParticleTable(particles.reset_index(drop=True), optics.reset_index(drop=True), None,
                          {"source_path": str(path.absolute()),
                           "source_format": "star31" if is31 else "star30"})
    if own:
        collect(probs, path)
    return table


def _locate_images(particles: pd.DataFrame, path: Path, datadir: Path | None, probs: list[str]) -> None:
    """Fill drgnStackPath (absolute), drgnStackIndex (0-based) and drgnImageSign.

    A STAR that is itself a drgnflow table (re-imported, or written by `drgn simulate`) carries these
    columns: they are authoritative there, because its rlnImageName keeps the user's original names,
    relative to wherever the original file was. Any other STAR is located through rlnImageName.
    """
    base = path.absolute().parent
    ours = {"drgnStackPath", "drgnStackIndex"} <= set(particles.columns)
    if ours:
        check_numeric(particles, ["drgnStackIndex", "drgnImageSign"], probs)
        index = particles["drgnStackIndex"].to_numpy(dtype=np.float64)
        bad = ~np.isfinite(index) | (index < 0)
        if bad.any():
            probs.append(f"{format_rows(np.flatnonzero(bad))}: drgnStackIndex is not a 0-based index")
        index = np.where(bad, -1, index).astype(np.int64)
        stacks = locate_stacks(particles["drgnStackPath"].astype("str"), base, datadir, probs)
    elif "rlnImageName" not in particles:
        probs.append("has no rlnImageName column; drgnflow needs the particle images")
        particles["rlnImageName"] = ""
        index = np.full(len(particles), -1, dtype=np.int64)
        stacks = np.full(len(particles), "", dtype=object)
    else:
        index, refs = parse_image_names(particles["rlnImageName"], probs)
        stacks = locate_stacks(refs, base, datadir, probs)
    sign = np.ones(len(particles), dtype=np.int64)
    if ours and "drgnImageSign" in particles:
        given = particles["drgnImageSign"].to_numpy(dtype=np.float64)
        bad = ~np.isin(given, [1.0, -1.0])
        if bad.any():
            probs.append(f"{format_rows(np.flatnonzero(bad))}: drgnImageSign must be +1 or -1")
        sign = np.where(given < 0, -1, 1).astype(np.int64)
    particles["drgnStackPath"] = stacks
    particles["drgnStackIndex"] = index
    particles["drgnImageSign"] = sign
    if "rlnImageName" not in particles:
        particles["rlnImageName"] = ""


def _optics_31(optics: pd.DataFrame, particles: pd.DataFrame, over: dict[str, float],
               probs: list[str], need_ctf: bool = True) -> pd.DataFrame:
    """Check a RELION 3.1 optics block against its particles; apply the user's overrides."""
    if "rlnOpticsGroup" not in optics:
        probs.append("data_optics has no rlnOpticsGroup column")
        optics["rlnOpticsGroup"] = np.arange(1, len(optics) + 1)
    check_numeric(optics, [*OPTICS_CTF_COLUMNS, "rlnImagePixelSize", "rlnImageSize", "rlnOpticsGroup"],
                  probs, "data_optics: ")
    for c in OPTICS_OVERRIDES:
        if c in over:
            optics[c] = over[c]
        elif c not in optics:
            if need_ctf:  # else a ctf.pkl supplies the optics, pixel size included
                probs.append(missing_column(c, "data_optics "))
            optics[c] = np.nan
    if "rlnImageSize" not in optics:
        optics["rlnImageSize"] = 0
    optics["rlnImageSize"] = optics["rlnImageSize"].fillna(0).astype(np.int64)
    if "rlnOpticsGroupName" not in optics:
        optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]])
    if "rlnImageDimensionality" not in optics:
        optics["rlnImageDimensionality"] = 2

    if "rlnOpticsGroup" not in particles:
        if len(optics) == 1:
            particles["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
        else:
            probs.append("data_particles has no rlnOpticsGroup column but data_optics defines "
                         f"{len(optics)} groups")
            particles["rlnOpticsGroup"] = 0
    check_numeric(particles, ["rlnOpticsGroup"], probs)
    og = particles["rlnOpticsGroup"].to_numpy()
    undefined = ~np.isin(og, optics["rlnOpticsGroup"].to_numpy())
    if undefined.any():
        bad_groups = pd.unique(og[undefined])
        probs.append(f"{format_rows(np.flatnonzero(undefined))}: optics group "
                     f"{', '.join(str(g) for g in bad_groups[:5])} is not defined in data_optics "
                     f"(it defines {', '.join(str(g) for g in optics['rlnOpticsGroup'])})")
    return optics


def _optics_30(particles: pd.DataFrame, over: dict[str, float], probs: list[str],
               need_ctf: bool = True) -> pd.DataFrame:
    """Build optics groups for a RELION 3.0 STAR from its per-particle optics columns (and overrides)."""
    check_numeric(particles, [*OPTICS_CTF_COLUMNS, "rlnDetectorPixelSize", "rlnMagnification",
                              "rlnImagePixelSize"], probs)
    n = len(particles)
    for c in OPTICS_CTF_COLUMNS:
        if c in over:
            particles[c] = over[c]
        elif c not in particles and need_ctf:
            probs.append(missing_column(c))
    if "rlnImagePixelSize" in over:
        px = np.full(n, over["rlnImagePixelSize"])
    elif "rlnImagePixelSize" in particles:
        px = particles["rlnImagePixelSize"].to_numpy(dtype=np.float64)
    elif "rlnDetectorPixelSize" in particles and "rlnMagnification" in particles:
        # RELION 3.0 convention: detector pixel size in µm, so Å/px = 1e4 · µm / magnification.
        with np.errstate(divide="ignore", invalid="ignore"):
            px = (particles["rlnDetectorPixelSize"].to_numpy(dtype=np.float64) * 1e4
                  / particles["rlnMagnification"].to_numpy(dtype=np.float64))
    else:
        if need_ctf:  # else a ctf.pkl supplies it
            probs.append("does not give the pixel size (no rlnImagePixelSize column, nor "
                         "rlnDetectorPixelSize and rlnMagnification); give it with --apix")
        px = np.full(n, np.nan)
    bad_px = ~(np.isfinite(px) & (px > 0))
    if bad_px.any() and not np.isnan(px).all():
        probs.append(f"{format_rows(np.flatnonzero(bad_px))}: pixel size is not a positive number")
    keys = pd.DataFrame({c: particles[c].to_numpy(dtype=np.float64) if c in particles else np.full(n, np.nan)
                         for c in OPTICS_CTF_COLUMNS})
    keys["rlnImagePixelSize"] = px
    group = number_optics_groups(keys) if n else np.zeros(0, dtype=np.int64)
    particles["rlnOpticsGroup"] = group
    first = pd.Series(np.arange(n)).groupby(group).first().to_numpy() if n else np.zeros(0, dtype=int)
    optics = keys.iloc[first].reset_index(drop=True)
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1))
    optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in range(1, len(optics) + 1)])
    optics["rlnImageSize"] = 0
    optics["rlnImageDimensionality"] = 2
    return optics[["rlnOpticsGroupName", *OPTICS_COLUMNS, "rlnImageDimensionality"]]


def _origins_to_angstrom(particles: pd.DataFrame, optics: pd.DataFrame, probs: list[str]) -> None:
    """Make sure rlnOriginX/YAngst exist: from pixel origins × the group's pixel size, or zero (RELION's
    meaning of absent origins)."""
    if all(c in particles for c in SHIFT_COLUMNS):
        return
    if "rlnOriginX" in particles and "rlnOriginY" in particles:
        lut = dict(zip(optics["rlnOpticsGroup"].to_numpy(), optics["rlnImagePixelSize"].to_numpy()))
        px = particles["rlnOpticsGroup"].map(lut).to_numpy(dtype=np.float64)
        particles["rlnOriginXAngst"] = particles["rlnOriginX"].to_numpy(dtype=np.float64) * px
        particles["rlnOriginYAngst"] = particles["rlnOriginY"].to_numpy(dtype=np.float64) * px
    else:
        particles["rlnOriginXAngst"] = 0.0
        particles["rlnOriginYAngst"] = 0.0


# ---- writing ---------------------------------------------------------------------------------------
def _relion_columns(df: pd.DataFrame, drop: set[str]) -> list[str]:
    return [c for c in df.columns if c.startswith("rln") and c not in drop]


def image_names_for(table: ParticleTable, out_dir: Path) -> pd.Series:
    """``NNNNNN@stack`` names (1-based) for every row, stack paths relative to `out_dir`."""
    paths = table.stack_paths()
    codes, uniq = pd.factorize(pd.Series(paths, dtype=object), sort=False)
    rel = np.asarray([os.path.relpath(str(u), str(out_dir)) for u in uniq], dtype=object)
    numbers = pd.Series(table.stack_indices() + 1).astype(str).str.zfill(6)
    return numbers + "@" + pd.Series(rel[codes], dtype="str")


def write_relion_star(table: ParticleTable, path: str | os.PathLike,
                      image_names: list[str] | np.ndarray | pd.Series | None = None) -> None:
    """Write `table` as a plain RELION 3.1 STAR (data_optics + data_particles, RELION labels only).

    Images are named ``NNNNNN@stack`` from drgnStackPath/drgnStackIndex, with the stack path relative to
    the STAR's folder, unless `image_names` (one per row) is given. Origins are in Å (rlnOriginX/YAngst);
    RELION 3.0 per-particle optics and pixel origins are left out (the optics block carries them).
    RELION has no label for the contrast sign: rows with drgnImageSign = -1 (cryoSPARC's dark stacks) point
    at images that RELION will read dark, as cryoSPARC-to-RELION conversions always have; write
    sign-corrected stacks first (e.g. with `drgn downsample` at the full box) when that matters.
    """
    path = Path(path)
    if image_names is None:
        names = image_names_for(table, path.absolute().parent)
    else:
        names = pd.Series(np.asarray(image_names, dtype=object), dtype="str")
        if len(names) != len(table):
            raise ValueError(f"image_names has {len(names)} entries for a table of {len(table)} rows")
    p = table.particles
    first = ["rlnImageName", *POSE_COLUMNS, *SHIFT_COLUMNS, *CTF_PARTICLE_COLUMNS, "rlnPhaseShift",
             "rlnOpticsGroup"]
    rest = [c for c in _relion_columns(p, LEGACY_PARTICLE_COLUMNS) if c not in first]
    particles = pd.DataFrame({"rlnImageName": names.to_numpy(dtype=object)})
    for c in first[1:]:
        if c == "rlnPhaseShift" and c not in p:
            particles[c] = 0.0
        else:
            particles[c] = p[c].to_numpy()
    for c in rest:
        particles[c] = p[c].to_numpy()
    optics = table.optics[_relion_columns(table.optics, set())].copy()
    if "rlnImageDimensionality" not in optics:
        optics["rlnImageDimensionality"] = 2
    write_star({"optics": optics, "particles": particles}, path)
