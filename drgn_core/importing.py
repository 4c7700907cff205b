"""`drgn import`: users' particle metadata (RELION STAR, cryoSPARC .cs) → the canonical particle table.

Import is where bad input must stop: every later stage trusts the table. So the importer checks
everything it can — each stack exists and is a readable MRC, each image index lies inside its stack, one
even square box, one known pixel size, CTF present and finite, poses finite, every optics group defined —
and reports all problems in one message, so a user fixes a broken file in one pass rather than one error
per run. Nothing is written unless the whole table is sound.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from drgn_core.errors import InputError, collect
from drgn_core.io.overrides import OVERRIDE_OPTIONS, supply_hint
from drgn_core.io.star import format_rows
from drgn_core.io.table import CTF_PARTICLE_COLUMNS, POSE_COLUMNS, SHIFT_COLUMNS, ParticleTable

FORMAT_NAMES = {"star30": "RELION 3.0 STAR", "star31": "RELION 3.1+ STAR", "cs": "cryoSPARC .cs",
                "txt": "stack list"}


def import_particles(path: str | os.PathLike, datadir: str | os.PathLike | None = None,
                     apix: float | None = None, box: int | None = None, invert: bool = False,
                     check_nan: bool = False, kv: float | None = None, cs: float | None = None,
                     amp_contrast: float | None = None, phase_shift: float | None = None,
                     poses: str | os.PathLike | None = None, ctf: str | os.PathLike | None = None,
                     allow_pickle: bool = False, no_poses: bool = False) -> ParticleTable:
    """Read a `.star`, `.cs` or `.txt` stack list into a validated canonical `ParticleTable`.

    `no_poses`: the file has no usable poses (CTF only, e.g. EMPIAR-10076's Parameters.star, or a 2D
    classification): poses are set to the identity and shifts to 0 (provenance `poses: none`), for
    `drgn abinit`, which finds them.

    `poses`: a second file (`.cs`, RELION `.star`, cryoDRGN ``poses.pkl``) whose poses replace the
    table's; `ctf`: a cryoDRGN ``ctf.pkl`` whose CTF and optics replace the table's (see
    `drgn_core.io.second_file`); `allow_pickle`: read cryoDRGN pickles (restricted unpickler). A `.txt`
    stack list holds images only, so it needs both.

    `datadir`: folder that stack paths are relative to (default: the input's folder); `apix`, `kv`, `cs`,
    `amp_contrast`, `phase_shift`: values that replace (or supply, where the file lacks them) the pixel
    size of the particle images (Å), the voltage (kV), Cs (mm), amplitude contrast and phase shift (°);
    `box`: expected box size, checked against the stacks;
    `invert`: flip the contrast (for stacks with dark particles that the metadata does not mark);
    `check_nan`: also scan every image for NaN/Inf pixels (reads all images).
    Raises one `InputError` listing every problem found.
    """
    from drgn_core.io.overrides import check_overrides, make_overrides

    path = Path(path)
    if not path.exists():
        raise InputError("no such file", path)
    if path.is_dir():
        raise InputError("is a folder; give the particle .star or .cs file", path)
    if datadir is not None and not Path(datadir).is_dir():
        raise InputError("is not a folder (--datadir)", datadir)
    overrides = make_overrides(apix, kv, cs, amp_contrast, phase_shift)
    bad = check_overrides(overrides)
    if bad:
        raise InputError("; ".join(bad), path)
    problems: list[str] = []
    suffix = path.suffix.lower()
    need_poses, need_ctf = poses is None and not no_poses, ctf is None
    if suffix == ".txt" and (need_poses or need_ctf):
        what = " and ".join(w for w, need in (("the poses with --poses", need_poses),
                                              ("the CTF with --ctf", need_ctf)) if need)
        raise InputError(f"is a stack list, which holds images only: give {what} (e.g. cryoDRGN's poses.pkl "
                         "and ctf.pkl, with --allow-pickle)", path)
    if ctf is not None and Path(ctf).suffix.lower() != ".pkl":
        raise InputError("--ctf reads a cryoDRGN ctf.pkl; for CTF in a STAR or .cs, import that file "
                         "itself and give the other one's poses with --poses", ctf)
    if suffix not in (".star", ".cs", ".txt"):
        raise InputError(f"unknown particle file type '{path.suffix}'; drgn import reads RELION .star, "
                         "cryoSPARC .cs and .txt stack lists", path)
    # Read the second files first: a refused pickle or a bad pose file stops before any stack is opened.
    ctf_values = pose_src = None
    try:
        if ctf is not None:
            from drgn_core.io.pickles import read_ctf_pkl
            ctf_values = read_ctf_pkl(ctf, allow_pickle)
        if poses is not None:
            from drgn_core.io.second_file import read_pose_source
            pose_src = read_pose_source(poses, allow_pickle, apix)
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, np.linalg.LinAlgError) as e:
        raise InputError(f"cannot read: malformed values ({type(e).__name__}: {e})",
                         poses if pose_src is None and poses is not None else ctf) from None
    try:
        if suffix == ".star":
            from drgn_core.io.star import read_relion_star
            table = read_relion_star(path, datadir, None, problems, overrides=overrides,
                                     need_poses=need_poses, need_ctf=need_ctf)
        elif suffix == ".cs":
            from drgn_core.io.cs import read_cs
            table = read_cs(path, datadir, None, problems, overrides=overrides, need_poses=need_poses,
                            need_ctf=need_ctf)
        else:
            from drgn_core.io.second_file import table_from_stacklist
            table = table_from_stacklist(path)
        if ctf_values is not None or pose_src is not None:
            _apply_second_files(table, path, ctf, ctf_values, pose_src, overrides, problems)
        if no_poses:  # identity poses and zero shifts: placeholders that drgn abinit replaces
            table.particles[POSE_COLUMNS] = 0.0
            table.particles[SHIFT_COLUMNS] = 0.0
            table.provenance["poses"] = "none"
        validate_table(table, problems, box=box)
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, np.linalg.LinAlgError) as e:
        # A damaged file that slipped past every specific check (the fuzz tests search for these): still
        # one line naming the file, with whatever was already found.
        found = f" after {len(problems)} problems: " + "; ".join(problems[:5]) if problems else ""
        raise InputError(f"cannot import: malformed values ({type(e).__name__}: {e}){found}", path) from None
    collect(problems, path)
    if invert:
        table.particles["drgnImageSign"] = -table.particles["drgnImageSign"].to_numpy()
    if check_nan:
        collect(find_nonfinite_images(table), path)
    table.provenance.update({"datadir": str(Path(datadir).absolute()) if datadir is not None else "",
                             "invert": str(bool(invert)).lower(),
                             **{f"override_{opt.lstrip('-').replace('-', '_')}": f"{overrides[c]:g}"
                                for c, opt in OVERRIDE_OPTIONS.items() if c in overrides}})
    return table


def _apply_second_files(table: ParticleTable, path: Path, ctf_path, ctf_values, pose_src, overrides: dict,
                        problems: list[str]) -> None:
    """Put the CTF of a ctf.pkl and the poses of a second file into `table` (rows checked and matched)."""
    from drgn_core.io.second_file import apply_ctf_pkl, apply_poses, match_rows, stack_box

    box = stack_box(table)
    if ctf_values is not None:
        apply_ctf_pkl(table, ctf_values, Path(ctf_path), overrides, box)
        table.provenance["ctf_source"] = str(Path(ctf_path).absolute())
    if pose_src is not None:
        order, how = match_rows(table, pose_src, path)
        px = table.optics["rlnImagePixelSize"].to_numpy(dtype=np.float64)
        if pose_src.fraction and (box is None or not np.isfinite(px).all()):
            problems.append("cannot convert the poses.pkl translations (a fraction of the box) to Å without "
                            "the box and the pixel size")
            return
        apply_poses(table, pose_src, order, box or 0, float(px[0]) if len(px) else 0.0)
        table.provenance.update({"poses_source": str(pose_src.path.absolute()), "poses_matched_by": how})


def _stack_refs(table: ParticleTable) -> pd.Series:
    """The stack of each row as the user's file wrote it (for messages)."""
    names = table.particles["rlnImageName"].astype("str")
    return names.str.partition("@")[2].where(names.str.contains("@", regex=False), names)


def _describe_image(table: ParticleTable, row: int) -> str:
    if table.provenance.get("source_format") == "cs":
        return f"blob/idx {int(table.particles['drgnStackIndex'].iloc[row])}"
    return f"rlnImageName {table.particles['rlnImageName'].iloc[row]}"


def validate_table(table: ParticleTable, problems: list[str], box: int | None = None) -> None:
    """Check a freshly read table against its stacks and itself; append problems; fill each optics group's
    rlnImageSize from the stacks where the metadata did not give it."""
    from drgn_core.io.mrc import read_stack_header

    p = table.particles
    if len(p) == 0:
        problems.append("holds no particles")
        return
    paths = p["drgnStackPath"].astype("str")
    codes, uniq = pd.factorize(paths, sort=False)
    refs = _stack_refs(table)
    idx = p["drgnStackIndex"].to_numpy(dtype=np.int64)
    first_row = pd.Series(np.arange(len(p))).groupby(codes).first().to_numpy()

    # Stack headers: existence was checked by the reader; read each existing stack's header once.
    counts = np.full(len(uniq), -1, dtype=np.int64)
    shapes: dict[tuple[int, int], list[int]] = {}
    for k, sp in enumerate(uniq):
        if not os.path.isfile(sp):
            continue
        try:
            n, ny, nx, _, _ = read_stack_header(sp)
        except InputError as e:
            problems.append(f"stack {refs.iloc[first_row[k]]}: {e}")
            continue
        counts[k] = n
        shapes.setdefault((ny, nx), []).append(k)

    # Indices within their stacks.
    n_per_row = counts[codes]
    beyond = np.flatnonzero((n_per_row >= 0) & (idx >= n_per_row))
    if len(beyond):
        for k in pd.unique(codes[beyond])[:10]:
            rows = beyond[codes[beyond] == k]
            more = f" (and {len(rows) - 1} more rows beyond its end)" if len(rows) > 1 else ""
            problems.append(f"row {rows[0]}: {_describe_image(table, int(rows[0]))} but "
                            f"{refs.iloc[rows[0]]} holds {counts[k]} images{more}")

    # One square, even box per optics group, agreeing with the metadata and --box. Groups may differ in
    # box (merged sessions); drgn downsample brings them to one.
    pairs = pd.DataFrame({"k": codes, "g": p["rlnOpticsGroup"].to_numpy()}).drop_duplicates()
    stacks_of = pairs.groupby("g")["k"].apply(list).to_dict()  # optics group → its stacks
    shape_of = {k: sh for sh, ks in shapes.items() for k in ks}
    sizes = table.optics["rlnImageSize"].to_numpy().copy()
    for gi, g in enumerate(table.optics["rlnOpticsGroup"].to_numpy()):
        group_shapes: dict[tuple[int, int], list[int]] = {}
        for k in stacks_of.get(g, []):
            if k in shape_of:
                group_shapes.setdefault(shape_of[k], []).append(k)
        if not group_shapes:
            continue
        where = f" in optics group {g}" if len(table.optics) > 1 else ""
        if len(group_shapes) > 1:
            desc = ", ".join(f"{ny}×{nx} ({refs.iloc[first_row[ks[0]]]}"
                             + (f" and {len(ks) - 1} more stacks)" if len(ks) > 1 else ")")
                             for (ny, nx), ks in group_shapes.items())
            problems.append(f"stacks{where} have different image sizes: {desc}; drgnflow needs one box "
                            "size per optics group")
            continue
        (ny, nx), = group_shapes
        ref = refs.iloc[first_row[group_shapes[(ny, nx)][0]]]
        if ny != nx:
            problems.append(f"stack {ref} holds {ny}×{nx} images; drgnflow needs square images")
        elif nx % 2:
            problems.append(f"box size {nx} (stack {ref}) is odd; drgnflow needs an even box "
                            "(re-extract or crop the particles to an even size)")
        if box is not None and box != nx:
            problems.append(f"--box {box} but the stacks{where} hold {ny}×{nx} images")
        if sizes[gi] and int(sizes[gi]) != nx:
            problems.append(f"optics group {g} says the box is {int(sizes[gi])} but the stacks hold "
                            f"{ny}×{nx} images")
        sizes[gi] = sizes[gi] if sizes[gi] > 0 else nx
    table.optics["rlnImageSize"] = sizes.astype(np.int64)

    _check_values(table, problems)


def _check_values(table: ParticleTable, problems: list[str]) -> None:
    """Finite poses/shifts/CTF, physical optics values. Optics groups may differ in pixel size (merged
    sessions): drgn downsample brings them to one, or says why it cannot."""
    p, o = table.particles, table.optics
    is_cs = table.provenance.get("source_format") == "cs"

    def label(c: str) -> str:
        return _CS_NAMES.get(c, c) if is_cs else c

    px = o["rlnImagePixelSize"].to_numpy(dtype=np.float64)
    # Origins in pixels cannot become Å without a pixel size; the reader already said it is missing.
    shifts = SHIFT_COLUMNS if not np.isnan(px).all() else []
    for c in [*POSE_COLUMNS, *shifts, *CTF_PARTICLE_COLUMNS, "rlnPhaseShift"]:
        if c in p and pd.api.types.is_numeric_dtype(p[c]):
            bad = np.flatnonzero(~np.isfinite(p[c].to_numpy(dtype=np.float64)))
            if len(bad):
                problems.append(f"{format_rows(bad)}: {label(c)} is NaN or infinite")
    if not np.isnan(px).all():  # all-NaN: the reader already said the pixel size is missing
        if not (np.isfinite(px) & (px > 0)).all():
            problems.append(f"pixel size {px.tolist()} Å is not a positive number")
    checks = (("rlnVoltage", lambda v: v > 0, "voltage (kV) must be positive"),
              ("rlnAmplitudeContrast", lambda v: (v >= 0) & (v < 1), "amplitude contrast must be in [0, 1)"),
              ("rlnSphericalAberration", np.isfinite, "Cs must be a finite number"))
    for c, ok, what in checks:
        if c in o and pd.api.types.is_numeric_dtype(o[c]):
            v = o[c].to_numpy(dtype=np.float64)
            if np.isnan(v).all():
                continue  # a missing column: the reader said so, naming the option that supplies it
            with np.errstate(invalid="ignore"):
                bad = ~(np.isfinite(v) & ok(v))
            for g, val in zip(o["rlnOpticsGroup"][bad], v[bad]):
                if np.isnan(val):
                    problems.append(f"optics group {g}: {label(c)} has no value; {supply_hint(c)}")
                else:
                    problems.append(f"optics group {g}: {label(c)} is {val:g}; {what}")


_CS_NAMES = {"rlnAngleRot": "alignments3D/pose", "rlnAngleTilt": "alignments3D/pose",
             "rlnAnglePsi": "alignments3D/pose", "rlnOriginXAngst": "alignments3D/shift",
             "rlnOriginYAngst": "alignments3D/shift", "rlnDefocusU": "ctf/df1_A", "rlnDefocusV": "ctf/df2_A",
             "rlnDefocusAngle": "ctf/df_angle_rad", "rlnPhaseShift": "ctf/phase_shift_rad",
             "rlnVoltage": "ctf/accel_kv", "rlnAmplitudeContrast": "ctf/amp_contrast",
             "rlnSphericalAberration": "ctf/cs_mm"}


def find_nonfinite_images(table: ParticleTable, chunk_size: int = 1000) -> list[str]:
    """Problems for images holding NaN or infinite pixels (reads every image once, with a progress bar)."""
    from drgn_core.io.images import ImageSource
    from drgn_core.progress import progress_bar

    src = ImageSource(table)
    bad_rows: list[np.ndarray] = []
    with progress_bar(total=len(table), desc="checking images for NaN", unit="img", leave=False) as bar:
        for box in np.unique(src.boxes):  # one read per box size (optics groups may differ)
            rows = np.flatnonzero(src.boxes == box)
            for start, images in src.chunks(chunk_size, rows):
                ok = np.isfinite(images).all(axis=(1, 2))
                bad_rows.append(rows[start + np.flatnonzero(~ok)])
                bar.update(len(images))
    src.close()
    rows = np.sort(np.concatenate(bad_rows)) if bad_rows else np.zeros(0, dtype=np.int64)
    if not len(rows):
        return []
    name = table.particles["rlnImageName"].iloc[int(rows[0])]  # N@stack (built from blob/* for a .cs)
    return [f"{format_rows(rows)}: image {name} contains NaN or infinite pixels"]


def summary(table: ParticleTable, source: str | os.PathLike) -> str:
    """One paragraph for the user: what was imported."""
    p, o = table.particles, table.optics
    n_stacks = p["drgnStackPath"].nunique()
    groups = "; ".join(
        f"{name}: {kv:g} kV, Cs {cs:g} mm, w {w:g}"
        for name, kv, cs, w in zip(o.get("rlnOpticsGroupName", o["rlnOpticsGroup"]), o["rlnVoltage"],
                                   o["rlnSphericalAberration"], o["rlnAmplitudeContrast"]))
    signs = table.image_signs()
    contrast = ("images used as stored" if (signs > 0).all()
                else "contrast inverted for all images" if (signs < 0).all()
                else f"contrast inverted for {(signs < 0).sum()} images")
    fmt = FORMAT_NAMES.get(table.provenance.get("source_format", ""), "particle file")
    second = ""
    if table.provenance.get("poses_source"):
        second += (f" Poses from {table.provenance['poses_source']}, rows matched by "
                   f"{table.provenance['poses_matched_by']}.")
    if table.provenance.get("ctf_source"):
        second += f" CTF from {table.provenance['ctf_source']}, rows matched by order."
    kinds = sorted({(int(d), round(float(a), 6)) for d, a in zip(o["rlnImageSize"], o["rlnImagePixelSize"])})
    sampling = " / ".join(f"box {d} px at {a:g} Å/px" for d, a in kinds)
    return (f"Imported {len(table)} particles from {source} ({fmt}): {sampling}, "
            f"{len(o)} optics group{'s' if len(o) != 1 else ''} ({groups}), "
            f"{n_stacks} stack{'s' if n_stacks != 1 else ''}; {contrast}.{second}")
