"""Identity-preserving export of a particle subset back to the tools the particles came from.

A subset chosen in drgnflow (0-based rows of the canonical table) goes back to the user as

- a RELION STAR that is a *row subset* of the user's original STAR: every block, every column and every
  value kept byte for byte (comments and header too), only the particle rows not selected dropped. The
  rows are found through the table's drgnSourceRow, and each one is checked against the table's
  rlnImageName, so a STAR that is not the one the table was imported from is refused rather than silently
  mis-subset. Image names stay as written (RELION resolves them against its project directory);
- when the source was a cryoSPARC `.cs`: a row subset of it (loaded and saved with cryosparc-tools, uids
  and every field intact; uids checked against the table's drgnUid), and a `.csg` result-group file
  beside it, as cryoSPARC 4.x writes one, for the Import Result Group job;
- when the poses came from a second file (`drgn import --poses`, the EMPIAR examples): NAME.relion.star, a
  RELION 3.1 STAR with an optics block that carries the poses and CTF the run used (image names as the
  original file wrote them), for RELION refinement; and, when that file was a cryoSPARC `.cs`, the row
  subset of it with its uids (NAME.poses.cs + NAME.poses.csg) for cryoSPARC's Import Result Group, since
  the particle file (a STAR without poses, say) carries neither the poses nor the uids cryoSPARC knows;
- `uids.txt` (one decimal uid per line) for cryoSPARC's Particle Sets Tool, when the particles have uids
  (the particle file's, else the poses file's);
- `indices.npy` / `indices.txt`: the canonical rows, in the exported order;
- with a folder of volumes (vol_*.mrc), a ChimeraX script that opens them as a volume series and plays
  it back and forth, at a level that encloses the top 1 % of the first volume's voxels by default.

Rows are exported in the order of the original file (so the output really is a subset of it), and
`indices.npy` follows that order. Every output is written atomically; an output that would replace an
input is refused.
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError
from drgn_core.io.atomic import atomic_path, refuse_overwrite_input
from drgn_core.io.indices import write_index_files
from drgn_core.io.table import ParticleTable

# the cryoSPARC release whose .csg layout we write (docs/architecture.md § cryoSPARC files)
CSG_VERSION = "v4.6.0"


# ---- RELION STAR row subsets -------------------------------------------------------------------------
@dataclass
class _StarLoop:
    """Where the particle loop of a STAR file sits, line by line."""

    block: str
    labels: list[str]
    row_lines: list[int] = field(default_factory=list)   # line numbers of the data rows


def _find_particle_loop(lines: list[str], path: Path) -> _StarLoop:
    """Locate the loop holding _rlnImageName (data_particles in RELION 3.1+, the only block in 3.0)."""
    loops: list[_StarLoop] = []
    block, current, in_header = "", None, False
    for i, raw in enumerate(lines):
        s = raw.strip()
        if s.startswith("data_"):
            block, current, in_header = s, None, False
        elif s == "loop_":
            current, in_header = _StarLoop(block, []), True
            loops.append(current)
        elif current is not None and s.startswith("_"):
            if not in_header:  # a label after data rows: a key-value pair, which ends the loop
                current = None
                continue
            current.labels.append(s.split()[0])
        elif current is not None and s and not s.startswith("#"):
            if s.startswith(";"):
                raise InputError(f"line {i + 1}: multi-line (semicolon) values are not supported in the "
                                 "particle loop", path)
            in_header = False
            current.row_lines.append(i)
    candidates = [lp for lp in loops if "_rlnImageName" in lp.labels]
    if not candidates:
        raise InputError("has no loop with _rlnImageName: not a RELION particle STAR file", path)
    named = [lp for lp in candidates if lp.block == "data_particles"]
    return (named or candidates)[0]


def _split_row(line: str) -> list[str]:
    return shlex.split(line) if ('"' in line or "'" in line) else line.split()


def _image_key(name: str) -> tuple[int, str]:
    """Compare image names by (index, normalised path): '000012@a/b.mrcs' == '12@a/b.mrcs'."""
    n, _, p = str(name).strip().partition("@")
    try:
        return int(n), os.path.normpath(p)
    except ValueError:
        return -1, os.path.normpath(str(name).strip())


def star_row_subset(source: str | os.PathLike, source_rows: np.ndarray,
                    expected_names: np.ndarray | None = None) -> tuple[str, int]:
    """Text of `source` with only the particle rows `source_rows` (0-based, in the order given) kept.

    Everything else (header comments, other blocks such as data_optics, the loop header) is copied
    verbatim. With `expected_names`, each kept row's rlnImageName must match (same index and path), which
    proves the file is the one the table was imported from. Returns (text, rows in the source file).
    """
    source = Path(source)
    try:
        text = source.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read as a text STAR file ({e})", source) from None
    lines = text.splitlines(keepends=True)
    loop = _find_particle_loop(lines, source)
    n_src = len(loop.row_lines)
    rows = np.asarray(source_rows, dtype=np.int64)
    if rows.size and rows.max() >= n_src:
        raise InputError(f"has {n_src} particle rows but the table refers to source row {int(rows.max())} "
                         "(0-based): is this the STAR file the table was imported from?", source)
    col = loop.labels.index("_rlnImageName")
    if expected_names is not None:
        for k, r in enumerate(rows):
            fields = _split_row(lines[loop.row_lines[r]])
            got = fields[col] if col < len(fields) else ""
            if _image_key(got) != _image_key(expected_names[k]):
                raise InputError(f"particle row {r} (0-based) is {got!r} but the table says that particle "
                                 f"came from {expected_names[k]!r}: this is not the STAR file the table was "
                                 "imported from", source)
    first, last = loop.row_lines[0], loop.row_lines[-1]
    head = lines[:first]
    tail = lines[last + 1:]
    body = [lines[loop.row_lines[r]] for r in rows]
    if body and not body[-1].endswith(("\n", "\r")):
        body[-1] += "\n"
    return "".join(head + body + tail), n_src


# ---- cryoSPARC .cs row subsets and the .csg group file ------------------------------------------------
def _slot_type(slot: str) -> str:
    """cryoSPARC result type of a particle slot: alignments_class_N hold 3D alignments, others their name."""
    if re.fullmatch(r"alignments_class_\d+", slot):
        return "particle.alignments3D"
    return f"particle.{slot}"


def csg_text(cs_name: str, slots: list[str], n: int, title: str, description: str) -> str:
    """YAML of a cryoSPARC result-group (.csg) file for a particle .cs named `cs_name` beside it.

    Keys as cryoSPARC 4.x writes them on export: created, group (name: particles, title, type: particle,
    description), results (one entry per slot: metafile '>NAME.cs', num_items, type particle.<slot>),
    version.
    """
    import yaml

    doc = {
        "created": datetime.datetime.now().replace(microsecond=0),
        "group": {"description": description, "name": "particles", "title": title, "type": "particle"},
        "results": {s: {"metafile": f">{cs_name}", "num_items": int(n), "type": _slot_type(s)}
                    for s in sorted(slots)},
        "version": CSG_VERSION,
    }
    return yaml.safe_dump(doc, sort_keys=True, default_flow_style=False)


def cs_row_subset(source: str | os.PathLike, source_rows: np.ndarray, expected_uids: np.ndarray | None):
    """cryosparc-tools Dataset holding rows `source_rows` of the .cs `source`, uids checked if given.

    The uid check is what proves the file is the one the table came from: uids are random 64-bit numbers.
    """
    from cryosparc.dataset import Dataset

    source = Path(source)
    try:
        ds = Dataset.load(source)
    except Exception as e:  # cryosparc-tools raises many kinds for a foreign file
        raise InputError(f"cannot read as a cryoSPARC .cs file ({type(e).__name__}: {e})", source) from None
    rows = np.asarray(source_rows, dtype=np.int64)
    if rows.size and rows.max() >= len(ds):
        raise InputError(f"has {len(ds)} particles but the table refers to source row {int(rows.max())} "
                         "(0-based): is this the .cs file the table was imported from?", source)
    sub = ds.take(rows)
    if expected_uids is not None:
        got = np.asarray(sub["uid"], dtype=np.uint64)
        bad = np.nonzero(got != np.asarray(expected_uids, dtype=np.uint64))[0]
        if bad.size:
            k = int(bad[0])
            raise InputError(f"row {int(rows[k])} has uid {int(got[k])} but the table says that particle has "
                             f"uid {int(expected_uids[k])}: this is not the .cs file the table was imported "
                             "from", source)
    return sub


# ---- ChimeraX --------------------------------------------------------------------------------------
def _natural_key(p: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))


def chimerax_series_script(volumes_dir: str | os.PathLike, script_path: str | os.PathLike,
                           level_percentile: float = 99.0) -> str:
    """Text of a ChimeraX .cxc that opens vol_*.mrc of `volumes_dir` as one volume series and plays it.

    Paths are relative to the script's folder (ChimeraX runs a .cxc from its own folder), so the pair
    can be moved together. The surface level is the `level_percentile` percentile of the first volume's
    voxels (99: the densest 1 % shown, ChimeraX's own choice for a freshly opened map) and is kept for the
    whole series, so changes of density between frames stay visible.
    """
    from drgn_core.io.mrc import read_mrc

    volumes_dir = Path(volumes_dir)
    if not volumes_dir.is_dir():
        raise InputError("no such folder of volumes", volumes_dir)
    vols = sorted(volumes_dir.glob("vol_*.mrc"), key=_natural_key)
    if not vols:
        raise InputError("holds no vol_*.mrc volumes (write them with drgn volumes / analyze / traverse)",
                         volumes_dir)
    first, _ = read_mrc(vols[0], mmap=False)
    level = float(np.percentile(np.asarray(first, dtype=np.float64), level_percentile))
    base = Path(script_path).resolve().parent
    names = " ".join(shlex.quote(os.path.relpath(v.resolve(), base)) for v in vols)
    n = len(vols)
    lines = [
        f"# drgnflow: {n} volumes from {volumes_dir} as a series; open this file in ChimeraX",
        f"# level = {level_percentile:g}th percentile of {vols[0].name}",
        f"open {names} vseries true",
        f"volume #1 style surface level {level:.6g}",
        "view",
        "vseries play #1 loop true direction oscillate maxFrameRate 10",
        "# To save a movie instead of playing in a loop, replace the line above with:",
        "#   movie record",
        "#   vseries play #1 loop false direction forward maxFrameRate 10",
        f"#   wait {max(n, 1) * 6}",
        "#   movie stop",
        "#   movie encode volumes.mp4",
    ]
    return "\n".join(lines) + "\n"


# ---- the export ------------------------------------------------------------------------------------
def source_of(table: ParticleTable, source: str | os.PathLike | None) -> Path:
    """The user's original STAR/.cs: `source` if given, else the table's recorded provenance."""
    if source is None:
        recorded = table.provenance.get("source_path")
        if recorded in (None, "", "nan"):
            raise InputError("records no source file (data_drgnflow source_path); pass --source with the "
                             "STAR or .cs the particles were imported from", table.path)
        p = Path(str(recorded))
        if not p.is_absolute() and table.path is not None:
            p = Path(table.path).parent / p
    else:
        p = Path(source)
    if not p.exists():
        raise InputError("source file does not exist (the original STAR or .cs the table was imported "
                         "from; pass it with --source)", p)
    if p.suffix.lower() not in (".star", ".cs"):
        raise InputError("source must be a RELION .star or a cryoSPARC .cs file", p)
    return p


def _poses_file(table: ParticleTable) -> tuple[Path | None, np.ndarray | None, np.ndarray | None]:
    """(the second file the poses came from, each row's row in it, its uids when a .cs), or Nones when
    the poses came with the particles. A poses file that has moved is an error: the export promised from
    it cannot be written."""
    rows = table.poses_rows()
    recorded = table.provenance.get("poses_source")
    if rows is None or recorded in (None, "", "nan"):
        return None, None, None
    path = Path(str(recorded))
    uids = table.poses_uids() if path.suffix.lower() == ".cs" else None
    if uids is not None and not path.is_file():
        raise InputError("the poses file the table was imported with (provenance poses_source) is gone; "
                         "the cryoSPARC export of the poses needs it", path)
    return path, rows, uids


def _write_cs_pair(cs_path: Path, csg_path: Path, dataset, group: str) -> None:
    """A cryoSPARC dataset and the .csg group file that names it, each written atomically (cryoSPARC's
    Import Result Group reads the pair; neither may be left half-written)."""
    with atomic_path(cs_path) as tmp:
        with open(tmp, "wb") as f:
            dataset.save(f)
    with atomic_path(csg_path) as tmp:
        tmp.write_text(group)


def export_subset(table: ParticleTable, indices: np.ndarray, outdir: str | os.PathLike,
                  source: str | os.PathLike | None = None, name: str = "subset",
                  volumes_dir: str | os.PathLike | None = None, level_percentile: float = 99.0,
                  extra_inputs: tuple = (), from_table: bool = False, flip_hand: bool = False) -> dict:
    """Export rows `indices` (0-based canonical rows) of `table` to `outdir`; returns a summary dict.

    `from_table` (or `flip_hand`) writes the files from the table itself (`export_from_table`) instead of
    as a row subset of the user's original file: how poses found by `drgn abinit` reach RELION/cryoSPARC.

    Files: NAME.star (STAR source) or NAME.cs + NAME.csg (.cs source), uids.txt (when uids are known),
    indices.npy/.txt, and volumes.cxc when `volumes_dir` is given. `extra_inputs` are further paths that
    must not be overwritten (e.g. the index file).
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise InputError(f"--name {name!r} must be a plain file name (letters, digits, _ . + -)")
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        raise InputError("no particles selected; nothing to export")
    if idx.min() < 0 or idx.max() >= len(table):
        raise InputError(f"index out of range: the table has {len(table)} rows, got "
                         f"{idx.min()} … {idx.max()}", table.path)
    if from_table or flip_hand:
        return export_from_table(table, idx, outdir, name, flip_hand, volumes_dir, level_percentile,
                                 extra_inputs)
    src = source_of(table, source)
    src_rows_all = table.source_rows()
    order = np.argsort(src_rows_all[idx], kind="stable")
    idx = idx[order]
    src_rows = src_rows_all[idx]
    if np.unique(src_rows).size != src_rows.size:
        raise InputError("selected particles share source rows (drgnSourceRow); cannot form a row subset",
                         table.path)

    outdir = Path(outdir)
    kind = "star" if src.suffix.lower() == ".star" else "cs"
    outputs = {"indices": outdir / "indices.npy", "indices_txt": outdir / "indices.txt"}
    if kind == "star":
        outputs["star"] = outdir / f"{name}.star"
    else:
        outputs["cs"] = outdir / f"{name}.cs"
        outputs["csg"] = outdir / f"{name}.csg"
    poses_path, poses_rows, poses_uids = _poses_file(table)
    if poses_path is not None:
        outputs["relion_star"] = outdir / f"{name}.relion.star"
        if poses_uids is not None:
            outputs["poses_cs"] = outdir / f"{name}.poses.cs"
            outputs["poses_csg"] = outdir / f"{name}.poses.csg"
    uids_all = table.uids()
    if uids_all is None and poses_uids is not None:
        uids_all = poses_uids
    if uids_all is not None:
        outputs["uids"] = outdir / "uids.txt"
    if volumes_dir is not None:
        outputs["chimerax"] = outdir / "volumes.cxc"
    inputs = [src, *(p for p in [table.path, poses_path, *extra_inputs] if p is not None)]
    refuse_overwrite_input(list(outputs.values()), inputs)

    # build everything in memory first, so a bad input leaves no files behind
    uids = uids_all[idx] if uids_all is not None else None
    summary: dict = {"n": int(idx.size), "n_table": len(table), "source": str(src), "source_format": kind}
    if kind == "star":
        if "rlnImageName" not in table.particles:
            raise InputError("has no rlnImageName column, so its rows cannot be matched to a STAR file",
                             table.path)
        names = table.particles["rlnImageName"].astype(str).to_numpy()[idx]
        star_text, n_src = star_row_subset(src, src_rows, names)
        summary["n_source"] = n_src
    else:
        cs_rows, cs_uids = src_rows, table.uids()
        if cs_uids is None and poses_uids is not None and src.resolve() == poses_path.resolve():
            cs_rows, cs_uids = poses_rows[idx], poses_uids[idx]  # --source the poses .cs: its rows
        elif cs_uids is not None:
            cs_uids = cs_uids[idx]
        if cs_uids is None:
            raise InputError(f"has no cryoSPARC uids (drgnUid), so it was not imported from {src.name}; "
                             "pass the STAR file it came from as --source", table.path)
        sub = cs_row_subset(src, cs_rows, cs_uids)
        slots = [p for p in sub.prefixes() if p != "uid"]
        title = f"{name} ({idx.size} particles)"
        desc = (f"drgnflow subset: {idx.size} of {len(table)} particles of {src.name}, rows in the "
                "original order")
        group = csg_text(outputs["cs"].name, slots, idx.size, title, desc)
        summary["slots"] = slots
    if "poses_cs" in outputs:
        # rows in the poses file's order, so the output really is a subset of it
        prow = poses_rows[idx]
        pord = np.argsort(prow, kind="stable")
        poses_sub = cs_row_subset(poses_path, prow[pord], poses_uids[idx][pord])
        poses_slots = [p for p in poses_sub.prefixes() if p != "uid"]
        poses_group = csg_text(outputs["poses_cs"].name, poses_slots, idx.size,
                               f"{name} poses ({idx.size} particles)",
                               f"drgnflow subset: {idx.size} of {len(table)} particles of {poses_path.name} "
                               "(the poses the run used), rows in the original order")
        summary["poses_source"] = str(poses_path)
        summary["poses_slots"] = poses_slots
    cxc = None
    if volumes_dir is not None:
        cxc = chimerax_series_script(volumes_dir, outputs["chimerax"], level_percentile)

    outdir.mkdir(parents=True, exist_ok=True)
    if kind == "star":
        with atomic_path(outputs["star"]) as tmp:
            tmp.write_text(star_text)
    else:
        _write_cs_pair(outputs["cs"], outputs["csg"], sub, group)
    if "poses_cs" in outputs:
        _write_cs_pair(outputs["poses_cs"], outputs["poses_csg"], poses_sub, poses_group)
    if "relion_star" in outputs:
        from drgn_core.io.star import write_relion_star

        sub_table = table.subset(idx)
        write_relion_star(sub_table, outputs["relion_star"],
                          image_names=sub_table.particles["rlnImageName"].astype(str).to_numpy())
    if uids is not None:
        with atomic_path(outputs["uids"]) as tmp:
            tmp.write_text("".join(f"{int(u)}\n" for u in uids))
    write_index_files(idx, outputs["indices"])
    if cxc is not None:
        with atomic_path(outputs["chimerax"]) as tmp:
            tmp.write_text(cxc)
    summary["files"] = {k: str(v) for k, v in outputs.items()}
    return summary


def export_from_table(table: ParticleTable, idx: np.ndarray, outdir: str | os.PathLike, name: str,
                      flip_hand: bool = False, volumes_dir: str | os.PathLike | None = None,
                      level_percentile: float = 99.0, extra_inputs: tuple = ()) -> dict:
    """Rows `idx` of the table written as NAME.star (RELION 3.1) and NAME.cs + NAME.csg (cryoSPARC),
    with the table's own poses and shifts (e.g. those `drgn abinit` found), not the source file's.

    `flip_hand` mirrors the poses, A → M·A·M with M = diag(1, 1, -1): the poses of the mirror-image map
    (`drgn volumes --flip`), for an ab initio map whose hand turned out wrong. Shifts are unchanged (the
    mirrored map projects onto the same image coordinates).
    """
    from drgn_core.io.cs import write_cs
    from drgn_core.io.star import write_relion_star
    from drgn_core.io.table import POSE_COLUMNS
    from drgn_core.pose import matrix_to_euler

    sub = table.subset(idx)
    if flip_hand:
        M = np.diag([1.0, 1.0, -1.0])
        sub.particles[POSE_COLUMNS] = matrix_to_euler(M @ sub.poses() @ M)
    outdir = Path(outdir)
    outputs = {"star": outdir / f"{name}.star", "cs": outdir / f"{name}.cs", "csg": outdir / f"{name}.csg",
               "indices": outdir / "indices.npy", "indices_txt": outdir / "indices.txt"}
    if volumes_dir is not None:
        outputs["chimerax"] = outdir / "volumes.cxc"
    refuse_overwrite_input(list(outputs.values()), [p for p in [table.path, *extra_inputs] if p is not None])
    cxc = chimerax_series_script(volumes_dir, outputs["chimerax"], level_percentile) if volumes_dir else None
    outdir.mkdir(parents=True, exist_ok=True)
    write_relion_star(sub, outputs["star"])
    write_cs(sub, outputs["cs"])
    slots = ["blob", "ctf", "alignments3D"]
    group = csg_text(outputs["cs"].name, slots, len(idx), f"{name} ({len(idx)} particles)",
                     f"drgnflow: {len(idx)} of {len(table)} particles, poses from {table.path}"
                     + (", hand flipped" if flip_hand else ""))
    with atomic_path(outputs["csg"]) as tmp:
        tmp.write_text(group)
    write_index_files(idx, outputs["indices"])
    if cxc is not None:
        with atomic_path(outputs["chimerax"]) as tmp:
            tmp.write_text(cxc)
    return {"n": int(idx.size), "n_table": len(table), "source": str(table.path), "source_format": "table",
            "flip_hand": bool(flip_hand), "files": {k: str(v) for k, v in outputs.items()}}
