"""cryoSPARC particle `.cs` files: reading into a `ParticleTable`, and writing a particle `.cs`.

The numpy format (a structured array, sometimes with a header larger than numpy's default limit) is
read with `np.load`, pickles refused; the compressed ``\\x95CSDAT`` stream format is decoded by cryoSPARC's
own library, cryosparc-tools, in a child process (its decoder crashes on damaged files), so we never
hand-parse either. Files we write are numpy-format `.cs` that cryosparc-tools reads back (tests check
that).

Conversions (docs/architecture.md § Conventions):

- ``alignments3D/pose`` is a rotation vector r with A = R(r)ᵀ → RELION Euler angles via the pose matrix;
- ``alignments3D/shift`` is in pixels of ``alignments3D/psize_A``, same sign as RELION's origins → Å;
- CTF angles are radians → degrees; ``df1_A``/``df2_A`` are RELION's DefocusU/V;
- ``blob/idx`` is 0-based; ``blob/path`` starts with '>' (cryoSPARC's "relative to the project" marker);
- ``blob/sign`` = -1 marks dark particles: it becomes drgnImageSign and is applied when images are read;
- ``uid`` is a uint64 kept exactly as a decimal string (values ≥ 2⁶³ are common).

Optics groups come from ``ctf/exp_group_id`` together with the optics tuple (kV, Cs, w, pixel size), so
two exposure groups never share a group and one with mixed optics is split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from drgn_core.errors import InputError, collect
from drgn_core.io.overrides import supply_hint
from drgn_core.io.star import format_rows, locate_stacks
from drgn_core.io.table import OPTICS_COLUMNS, ParticleTable
from drgn_core.pose import euler_to_matrix, matrix_to_euler, matrix_to_rotvec, rotvec_to_matrix

CTF_FIELDS = ["ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast"]
# .cs fields that a `drgn import` option can supply (drgn_core.io.overrides).
CS_FIELD_COLUMNS = {"blob/psize_A": "rlnImagePixelSize", "ctf/accel_kv": "rlnVoltage",
                    "ctf/cs_mm": "rlnSphericalAberration", "ctf/amp_contrast": "rlnAmplitudeContrast",
                    "ctf/phase_shift_rad": "rlnPhaseShift"}
NO_POSES_HINT = ("drgnflow needs consensus poses: use the particles output of a 3D refinement "
                 "(e.g. J42/J42_particles.cs or its exported particles)")


CSDAT_MAGIC = b"\x95CSDAT"
# Run in a child process: cryosparc-tools' stream decoder crashes the interpreter (SIGSEGV) on a truncated
# or damaged stream-format file (found by tests/test_fuzz_readers.py), so it decodes there, into the
# numpy format, which is then read here.
_CSDAT_TO_NUMPY = """
import sys
from cryosparc.dataset import NUMPY_FORMAT, Dataset
d = Dataset.load(sys.argv[1])
with open(sys.argv[2], "wb") as f:
    d.save(f, format=NUMPY_FORMAT)
"""
# cryoSPARC's numpy-format headers can exceed numpy's default 10 kB limit (hundreds of fields).
_MAX_HEADER = 10_000_000


class NumpyDataset:
    """The read-only part of cryosparc-tools' `Dataset` interface that the readers use, over a numpy
    structured array.

    Numpy-format `.cs` files are read with `np.load` (pickles refused) rather than by cryosparc-tools:
    its native core has been seen to corrupt memory on damaged files (a later, unrelated call then
    crashed), while numpy validates the header and refuses what does not fit.
    """

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def fields(self) -> list[str]:
        return list(self.array.dtype.names or ())

    def __getitem__(self, name: str) -> np.ndarray:
        return self.array[name]


def _load_numpy_cs(path: Path) -> NumpyDataset:
    arr = np.load(path, allow_pickle=False, max_header_size=_MAX_HEADER)
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None or arr.ndim != 1:
        raise InputError("is a numpy file but not a cryoSPARC dataset (a 1-D array of named fields)", path)
    return NumpyDataset(arr)


def load_dataset(path: str | os.PathLike) -> NumpyDataset:
    """The fields of a `.cs` file (`NumpyDataset`), with a one-line error for anything unreadable.

    The compressed stream format (magic ``\\x95CSDAT``) is decoded by cryosparc-tools in a child
    process, so a damaged file that crashes the decoder gives an error instead of killing drgnflow.
    """
    import subprocess
    import sys
    import tempfile

    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(CSDAT_MAGIC))
        if magic != CSDAT_MAGIC:
            return _load_numpy_cs(path)
        with tempfile.TemporaryDirectory(prefix="drgn-cs-") as tmp:
            out = Path(tmp) / "dataset.cs"
            proc = subprocess.run([sys.executable, "-c", _CSDAT_TO_NUMPY, str(path), str(out)],
                                  capture_output=True, text=True)
            if proc.returncode:
                last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
                why = last if proc.returncode > 0 else f"the decoder crashed (signal {-proc.returncode})"
                raise InputError(f"cannot read as a cryoSPARC .cs file (damaged or truncated stream format: "
                                 f"{why})", path)
            return _load_numpy_cs(out)
    except InputError as e:
        if e.path == str(path):
            raise
        raise InputError(str(e).split(": ", 1)[-1], path) from None
    except Exception as e:  # numpy raises several kinds for truncated/foreign files
        raise InputError(f"cannot read as a cryoSPARC .cs file ({type(e).__name__}: {e})", path) from None


def _strings(values: np.ndarray) -> pd.Series:
    """A cryoSPARC string field (bytes or str) as a pandas string Series."""
    s = pd.Series(values, dtype=object)
    if len(s) and isinstance(s.iloc[0], bytes):
        s = s.str.decode("utf-8", errors="replace")  # a damaged path then names no file
    return s.astype("str")


def read_cs(path: str | os.PathLike, datadir: str | os.PathLike | None = None, apix: float | None = None,
            problems: list[str] | None = None, overrides: dict[str, float] | None = None,
            need_poses: bool = True, need_ctf: bool = True) -> ParticleTable:
    """Read a cryoSPARC particle `.cs` into a canonical `ParticleTable`.

    `datadir` is the cryoSPARC project folder that ``blob/path`` is relative to (default: the `.cs`'s
    folder); `apix` overrides the image pixel size (``blob/psize_A``). With `problems` given, problems are
    appended to it and a best-effort table returned (see `drgn_core.io.star.read_relion_star`); a file
    without blob fields (or without poses when `need_poses`) cannot give a table and raises at once.
    `overrides`, `need_poses`, `need_ctf`: as for `drgn_core.io.star.read_relion_star` (fields named by
    an override need not be in the file; missing pose fields become NaN for the caller to replace).
    """
    path = Path(path)
    own = problems is None
    probs: list[str] = [] if own else problems
    over = dict(overrides or {})
    if apix is not None:
        over["rlnImagePixelSize"] = float(apix)
    d = load_dataset(path)
    fields = set(d.fields())
    fatal = [f for f in ("alignments3D/pose", "blob/path", "blob/idx") if f not in fields
             and (need_poses or f != "alignments3D/pose")]
    if fatal:
        hint = NO_POSES_HINT if "alignments3D/pose" in fatal else "drgnflow needs the particle images"
        raise InputError(f"has no {', '.join(fatal)} field; {hint}", path)
    if need_ctf:
        for f in CTF_FIELDS:
            col = CS_FIELD_COLUMNS.get(f)
            if f not in fields and col not in over:
                hint = supply_hint(col) if col else "drgnflow needs CTF parameters"
                probs.append(f"has no {f} field; {hint}")
    n = len(d)

    def field(name: str, default: float | None = None) -> np.ndarray:
        col = CS_FIELD_COLUMNS.get(name)
        if col in over:
            return np.full(n, over[col])
        if name in fields:
            return np.asarray(d[name], dtype=np.float64)
        return np.full(n, np.nan if default is None else default)

    psize_blob = np.round(field("blob/psize_A"), 6)
    if "blob/psize_A" not in fields and "rlnImagePixelSize" not in over:
        probs.append("has no blob/psize_A field; give the pixel size with --apix")
    psize_align = np.round(np.asarray(d["alignments3D/psize_A"], dtype=np.float64), 6) \
        if "alignments3D/psize_A" in fields else psize_blob

    euler = np.full((n, 3), np.nan)
    if "alignments3D/pose" in fields:
        rotvec = np.asarray(d["alignments3D/pose"], dtype=np.float64).reshape(n, -1)
        ok = np.isfinite(rotvec).all(axis=1) & (np.abs(rotvec).max(axis=1, initial=0) < 1e6)
        if rotvec.shape[1] != 3:
            raise InputError(f"alignments3D/pose holds {rotvec.shape[1]} values per particle; expected a "
                             "rotation vector of 3", path)
        if (~ok).any():
            probs.append(f"{format_rows(np.flatnonzero(~ok))}: alignments3D/pose is NaN, infinite or absurd")
        euler[ok] = matrix_to_euler(rotvec_to_matrix(rotvec[ok]))
    shift_px = np.asarray(d["alignments3D/shift"], dtype=np.float64) if "alignments3D/shift" in fields \
        else np.zeros((n, 2))
    particles = pd.DataFrame({
        "rlnAngleRot": euler[:, 0], "rlnAngleTilt": euler[:, 1], "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": shift_px[:, 0] * psize_align, "rlnOriginYAngst": shift_px[:, 1] * psize_align,
        "rlnDefocusU": field("ctf/df1_A"), "rlnDefocusV": field("ctf/df2_A"),
        "rlnDefocusAngle": np.rad2deg(field("ctf/df_angle_rad")),
        "rlnPhaseShift": (np.full(n, over["rlnPhaseShift"]) if "rlnPhaseShift" in over  # degrees
                          else np.rad2deg(field("ctf/phase_shift_rad", 0.0))),
        "rlnCtfBfactor": field("ctf/bfactor", 0.0),
    })
    if "alignments3D/split" in fields:
        particles["rlnRandomSubset"] = np.asarray(d["alignments3D/split"], dtype=np.int64) + 1

    # Optics groups: exposure group + optics tuple, numbered in sorted order of exposure group.
    exp = np.asarray(d["ctf/exp_group_id"], dtype=np.int64) if "ctf/exp_group_id" in fields \
        else np.zeros(n, dtype=np.int64)
    keys = pd.DataFrame({"exp": exp, "rlnVoltage": field("ctf/accel_kv"),
                         "rlnSphericalAberration": field("ctf/cs_mm"),
                         "rlnAmplitudeContrast": field("ctf/amp_contrast"),
                         "rlnImagePixelSize": psize_blob})
    for c in keys.columns[1:]:
        keys[c] = keys[c].round(6)
    group = keys.groupby(list(keys.columns), sort=True, dropna=False).ngroup().to_numpy() + 1 \
        if n else np.zeros(0, dtype=np.int64)
    particles["rlnOpticsGroup"] = group
    first = pd.Series(np.arange(n)).groupby(group).first().to_numpy() if n else np.zeros(0, dtype=int)
    optics = keys.iloc[first].reset_index(drop=True)
    per_exp = optics.groupby("exp").cumcount().to_numpy()
    n_in_exp = optics.groupby("exp")["exp"].transform("size").to_numpy()
    names = [f"exp_group_{e}" + (f"_{k + 1}" if m > 1 else "")
             for e, k, m in zip(optics["exp"], per_exp, n_in_exp)]
    optics = optics.drop(columns="exp")
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1))
    optics.insert(0, "rlnOpticsGroupName", names)
    optics["rlnImageSize"] = _box_per_group(d, fields, group, len(optics), probs)
    optics["rlnImageDimensionality"] = 2
    optics = optics[["rlnOpticsGroupName", *OPTICS_COLUMNS, "rlnImageDimensionality"]]

    # Image locations.
    refs = _strings(d["blob/path"]).str.removeprefix(">")
    index = np.asarray(d["blob/idx"], dtype=np.int64)
    particles.insert(0, "rlnImageName", (pd.Series(index + 1).astype(str).str.zfill(6) + "@" + refs)
                     .to_numpy(dtype=object))
    particles["rlnImageName"] = particles["rlnImageName"].astype("str")
    particles["drgnStackPath"] = locate_stacks(refs, path.absolute().parent,
                                               Path(datadir) if datadir is not None else None, probs)
    particles["drgnStackIndex"] = index
    sign = field("blob/sign", 1.0)
    bad_sign = ~np.isin(sign, [1.0, -1.0])
    if bad_sign.any():
        probs.append(f"{format_rows(np.flatnonzero(bad_sign))}: blob/sign is {sign[bad_sign][0]:g}, "
                     "expected +1 or -1")
    particles["drgnImageSign"] = np.where(sign < 0, -1, 1).astype(np.int64)
    particles["drgnSourceRow"] = np.arange(n, dtype=np.int64)
    if "uid" in fields:
        particles["drgnUid"] = pd.Series(np.asarray(d["uid"], dtype=np.uint64).astype(str), dtype="str")

    table = ParticleTable(particles, optics, None,
                          {"source_path": str(path.absolute()), "source_format": "cs"})
    if own:
        collect(probs, path)
    return table


def _box_per_group(d, fields: set[str], group: np.ndarray, n_groups: int, probs: list[str]) -> np.ndarray:
    """rlnImageSize per optics group from ``blob/shape`` (0 where unknown: the importer reads stacks)."""
    if "blob/shape" not in fields or not len(group):
        return np.zeros(n_groups, dtype=np.int64)
    shape = np.asarray(d["blob/shape"], dtype=np.int64).reshape(len(group), -1)
    # Groups may differ in box (merged sessions; drgn downsample brings them to one), not within a group.
    pairs = pd.DataFrame({"g": group, "y": shape[:, 0], "x": shape[:, -1]}).drop_duplicates()
    mixed = pairs[pairs.duplicated("g", keep=False)]
    if len(mixed):
        probs.append("blob/shape differs between particles of one optics group ("
                     + ", ".join(f"{y}×{x}" for y, x in zip(mixed["y"][:5], mixed["x"][:5]))
                     + "); drgnflow needs one box size per optics group")
    box = np.zeros(n_groups, dtype=np.int64)
    box[pairs["g"].to_numpy() - 1] = pairs["x"].to_numpy()
    return box


# ---- writing ---------------------------------------------------------------------------------------
def fresh_uids(n: int, seed: int) -> np.ndarray:
    """n distinct random uint64 uids (cryoSPARC's are random 64-bit integers), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    uids = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    while len(np.unique(uids)) < n:  # collisions are astronomically rare; redraw the duplicates
        _, first = np.unique(uids, return_index=True)
        dup = np.setdiff1d(np.arange(n), first)
        uids[dup] = rng.integers(0, np.iinfo(np.uint64).max, size=len(dup), dtype=np.uint64, endpoint=True)
    return uids


def table_uids(table: ParticleTable, seed: int = 0) -> np.ndarray:
    """The table's cryoSPARC uids; when it has none, fresh ones are drawn and stored in drgnUid so every
    later file written for this table names the particles the same way."""
    uids = table.uids()
    if uids is None:
        uids = fresh_uids(len(table), seed)
        table.particles["drgnUid"] = pd.Series(uids.astype(str), dtype="str")
    return uids


def build_cs_fields(table: ParticleTable, out_dir: Path, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """(field, column) pairs of a cryoSPARC particle dataset for `table` (blob, ctf, alignments3D)."""
    n = len(table)
    ctf = table.ctf_params()
    apix = table.apix
    paths = table.stack_paths()
    codes, uniq = pd.factorize(pd.Series(paths, dtype=object), sort=False)
    rel = np.asarray([">" + os.path.relpath(str(u), str(out_dir)) for u in uniq], dtype=object)
    if "rlnRandomSubset" in table.particles:
        split = np.clip(table.particles["rlnRandomSubset"].to_numpy(dtype=np.int64) - 1, 0, 1)
    else:
        split = np.arange(n) % 2  # deterministic, balanced halves
    f4 = np.float32
    return [
        ("uid", table_uids(table, seed)),
        ("blob/path", rel[codes]),
        ("blob/idx", table.stack_indices().astype(np.uint32)),
        ("blob/shape", np.tile(np.array([table.box, table.box], dtype=np.uint32), (n, 1))),
        ("blob/psize_A", np.full(n, apix, dtype=f4)),
        ("blob/sign", table.image_signs().astype(f4)),
        ("ctf/type", np.full(n, "imported", dtype=object)),
        ("ctf/exp_group_id", table.particles["rlnOpticsGroup"].to_numpy().astype(np.uint32)),
        ("ctf/accel_kv", ctf[:, 4].astype(f4)),
        ("ctf/cs_mm", ctf[:, 5].astype(f4)),
        ("ctf/amp_contrast", ctf[:, 6].astype(f4)),
        ("ctf/df1_A", ctf[:, 1].astype(f4)),
        ("ctf/df2_A", ctf[:, 2].astype(f4)),
        ("ctf/df_angle_rad", np.deg2rad(ctf[:, 3]).astype(f4)),
        ("ctf/phase_shift_rad", np.deg2rad(ctf[:, 7]).astype(f4)),
        ("ctf/scale", np.ones(n, dtype=f4)),
        ("ctf/scale_const", np.zeros(n, dtype=f4)),
        ("ctf/bfactor", ctf[:, 8].astype(f4)),
        ("alignments3D/split", split.astype(np.uint32)),
        ("alignments3D/shift", (table.shifts_A() / apix).astype(f4)),
        ("alignments3D/pose", matrix_to_rotvec(euler_to_matrix(table.euler())).astype(f4)),
        ("alignments3D/psize_A", np.full(n, apix, dtype=f4)),
        ("alignments3D/error", np.zeros(n, dtype=f4)),
        ("alignments3D/alpha", np.ones(n, dtype=f4)),
        ("alignments3D/class_posterior", np.ones(n, dtype=f4)),
        ("alignments3D/class", np.zeros(n, dtype=np.uint32)),
    ]


def write_cs(table: ParticleTable, path: str | os.PathLike, seed: int = 0) -> np.ndarray:
    """Write `table` as a cryoSPARC particle `.cs` (numpy format), atomically; returns the uids.

    ``blob/path`` is '>' + the stack path relative to the `.cs`'s folder; shifts are written in pixels of
    the table's pixel size. uids come from drgnUid, or are drawn from `seed` and stored into the table.
    """
    from cryosparc.dataset import NUMPY_FORMAT, Dataset

    from drgn_core.io.atomic import atomic_path

    path = Path(path)
    cols = build_cs_fields(table, path.absolute().parent, seed)
    dataset = Dataset(cols)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        dataset.save(f, format=NUMPY_FORMAT)
    return cols[0][1]
