"""cryoDRGN's pickles (``poses.pkl``, ``ctf.pkl``, ``*.ind.pkl``), read through a restricted unpickler.

A pickle can name any Python callable, and unpickling calls it: opening an untrusted `.pkl` with
`pickle.load` runs whatever code its author chose. cryoDRGN writes its inputs as pickles, and the
paper's inputs come only in that form, so drgnflow reads them, but only when the user says
``--allow-pickle``, and only through `RestrictedUnpickler`, which admits exactly the numpy globals that
cryoDRGN's files use (an array is rebuilt from ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``
and ``numpy.dtype``; a list of numpy integers also uses ``numpy.core.multiarray.scalar``; NumPy 2 spells
the module ``numpy._core``). Anything else, and any malformed or truncated file, is refused with one
line naming the file. drgnflow never writes a pickle.

What the files hold (cryoDRGN's ``parse_pose_star`` / ``parse_pose_csparc`` / ``parse_ctf_*``):

- ``poses.pkl``: a tuple ``(rot, trans)``: rot (N, 3, 3) is drgnflow's pose matrix A itself (the matrix
  whose transpose maps the central slice into the volume; checked against the conventions fixture in
  tests/test_import_second_file.py); trans (N, 2) is RELION's origin (same sign as rlnOriginX/Y) divided
  by the box size D in pixels, i.e. a fraction of the box.
- ``ctf.pkl``: float32 (N, 9): D, Å/px, defocus U, defocus V (Å), defocus angle (°), kV, Cs (mm),
  amplitude contrast, phase shift (°).
- ``*.ind.pkl``: an int64 array, or a Python list of numpy int64, of 0-based rows, in a meaningful order.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError

ALLOW_HINT = ("it is a Python pickle, which can run code when read; give --allow-pickle to read a "
              "cryoDRGN pickle you trust")
# (module, name) of every global a cryoDRGN pickle may name: both NumPy 1 and NumPy 2 spellings.
ALLOWED_GLOBALS = frozenset({
    (mod, name)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")})
CTF_PKL_COLUMNS = ["D", "apix", "dfU", "dfV", "dfang", "kv", "cs", "w", "phase"]


# Plain numeric types only: what cryoDRGN's arrays hold. Object, string, structured and sub-array dtypes
# are refused (an object array would carry arbitrary Python objects).
_SAFE_KINDS = "biuf"
_MAX_ELEMENTS = 2_000_000_000


class _NDArrayMarker:
    """Stands for ``numpy.ndarray`` where a pickle names it (only as ``_reconstruct``'s first argument)."""


class _DTypeProxy:
    """A numpy dtype rebuilt from its pickled form, checked, without numpy's own ``__setstate__``.

    numpy's dtype ``__setstate__`` trusts the flags it is given: a damaged pickle can mark a float dtype
    as holding Python objects, after which numpy reference-counts garbage and the interpreter aborts
    (found by tests/test_fuzz_readers.py). So the state is read here and only the byte order is kept.
    """

    def __init__(self, spec: object, align: object = False, copy: object = True):
        if not isinstance(spec, str) or len(spec) > 8:
            raise pickle.UnpicklingError(f"it holds a dtype {spec!r} that is not a plain numeric type")
        try:
            dt = np.dtype(spec)
        except TypeError:
            raise pickle.UnpicklingError(f"it holds an unknown dtype {spec!r}") from None
        if dt.kind not in _SAFE_KINDS or dt.fields is not None or dt.subdtype is not None:
            raise pickle.UnpicklingError(f"it holds a {dt} array; a cryoDRGN pickle holds numbers only")
        self.dtype = dt

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError("it holds a malformed dtype")
        if any(v is not None for v in state[2:5]):  # sub-array, names, fields
            raise pickle.UnpicklingError("it holds a structured dtype; a cryoDRGN pickle holds numbers only")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


class _ArrayProxy:
    """An ndarray rebuilt from its pickled state with `np.frombuffer`, after checking that the shape, the
    type and the number of bytes agree (numpy's ``__setstate__`` is not relied on for that)."""

    array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("it holds a malformed array")
        _, shape, dt, fortran, raw = state
        if not isinstance(dt, _DTypeProxy):
            raise pickle.UnpicklingError("it holds an array without a plain numeric dtype")
        if not isinstance(shape, tuple) or not all(isinstance(k, int) and 0 <= k for k in shape):
            raise pickle.UnpicklingError(f"it holds an array of malformed shape {shape!r}")
        n = int(np.prod(shape, dtype=np.float64)) if shape else 1
        if n > _MAX_ELEMENTS:
            raise pickle.UnpicklingError(f"it declares an array of {n} elements")
        if not isinstance(raw, bytes | bytearray) or len(raw) != n * dt.dtype.itemsize:
            got = len(raw) if isinstance(raw, bytes | bytearray) else type(raw).__name__
            raise pickle.UnpicklingError(f"it holds an array of shape {shape} whose data is {got} bytes, "
                                         f"not {n * dt.dtype.itemsize}")
        self.array = np.frombuffer(bytes(raw), dtype=dt.dtype).reshape(shape, order="F" if fortran else "C"
                                                                        ).copy()


def _reconstruct(cls: object, shape: object = (0,), typecode: object = b"b") -> _ArrayProxy:
    if cls is not _NDArrayMarker:
        raise pickle.UnpicklingError("it rebuilds something other than a numpy array")
    return _ArrayProxy()


def _scalar(dt: object, raw: object = b"") -> np.generic:
    if not isinstance(dt, _DTypeProxy) or not isinstance(raw, bytes) or len(raw) != dt.dtype.itemsize:
        raise pickle.UnpicklingError("it holds a malformed numpy scalar")
    return np.frombuffer(raw, dtype=dt.dtype)[0]


_SAFE_OBJECTS = {"ndarray": _NDArrayMarker, "dtype": _DTypeProxy, "_reconstruct": _reconstruct,
                 "scalar": _scalar}


def _materialize(obj: object, depth: int = 0) -> object:
    """Replace the array proxies in what was unpickled by their arrays."""
    if depth > 20:
        raise pickle.UnpicklingError("it nests containers too deeply")
    if isinstance(obj, _ArrayProxy):
        if obj.array is None:
            raise pickle.UnpicklingError("it holds an array without data")
        return obj.array
    if isinstance(obj, _DTypeProxy | _NDArrayMarker) or obj is _NDArrayMarker:
        raise pickle.UnpicklingError("it holds a bare numpy type")
    if isinstance(obj, tuple):
        return tuple(_materialize(v, depth + 1) for v in obj)
    if isinstance(obj, list):
        return [_materialize(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        return {k: _materialize(v, depth + 1) for k, v in obj.items()}
    return obj


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `ALLOWED_GLOBALS`, to checked stand-ins (never numpy's own
    reconstructors), and no persistent ids. `load` returns real numpy arrays and scalars."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"it names the global {module}.{name}, which a cryoDRGN pickle "
                                         "never holds; refusing to load it")
        return _SAFE_OBJECTS[name]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it uses persistent ids, which a cryoDRGN pickle never holds")

    def load(self):
        return _materialize(super().load())


def load_pickle(path: str | os.PathLike, allow_pickle: bool, what: str = "cryoDRGN pickle") -> object:
    """The object in a cryoDRGN pickle, through `RestrictedUnpickler`; `InputError` for everything else."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path)
    if not allow_pickle:
        raise InputError(f"not read: {ALLOW_HINT}", path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror})", path) from None
    f = io.BytesIO(data)
    try:
        obj = RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:
        msg = str(e)
        if msg.startswith("it "):
            raise InputError(f"cannot read as a {what}: {msg}", path) from None
        raise InputError(f"cannot read as a {what} (UnpicklingError: {msg})", path) from None
    except Exception as e:  # truncated or corrupt data raises EOFError, ValueError, TypeError, …
        raise InputError(f"cannot read as a {what} ({type(e).__name__}: {e})", path) from None
    if f.tell() != len(data):
        raise InputError(f"cannot read as a {what}: {len(data) - f.tell()} bytes follow the pickle", path)
    return obj


def _float_array(obj: object, path: Path, what: str, shape_tail: tuple[int, ...]) -> np.ndarray:
    if not isinstance(obj, np.ndarray) or obj.dtype.kind not in "fiu" or obj.shape[1:] != shape_tail \
            or obj.ndim != 1 + len(shape_tail):
        got = (f"an array of shape {obj.shape} and type {obj.dtype}" if isinstance(obj, np.ndarray)
               else f"a {type(obj).__name__}")
        want = "(N, " + ", ".join(map(str, shape_tail)) + ")"
        raise InputError(f"{what} holds {got}; expected a numeric array of shape {want}", path)
    if not len(obj):
        raise InputError(f"{what} holds no rows", path)
    arr = obj.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), int(np.prod(shape_tail)))).all(axis=1))
    if len(bad):
        raise InputError(f"{what} row {int(bad[0])} holds NaN or infinite values"
                         + (f" ({len(bad)} rows)" if len(bad) > 1 else ""), path)
    return arr


def read_poses_pkl(path: str | os.PathLike, allow_pickle: bool) -> tuple[np.ndarray, np.ndarray]:
    """(A (N, 3, 3), trans (N, 2) as a fraction of the box) from a cryoDRGN ``poses.pkl``.

    A bare rotation array (no translations) is accepted as zero translations. Every matrix must be a
    rotation (orthonormal, determinant +1, to 1e-3): anything else is not a pose file.
    """
    path = Path(path)
    obj = load_pickle(path, allow_pickle, "cryoDRGN poses.pkl")
    if isinstance(obj, tuple) and len(obj) == 2:
        rot, trans = obj
    elif (isinstance(obj, tuple) and len(obj) == 1) or isinstance(obj, np.ndarray):
        rot, trans = (obj[0] if isinstance(obj, tuple) else obj), None
    else:
        raise InputError(f"holds a {type(obj).__name__}"
                         + (f" of {len(obj)} items" if isinstance(obj, tuple) else "")
                         + "; a cryoDRGN poses.pkl holds a tuple (rotations (N, 3, 3), translations (N, 2))",
                         path)
    rot = _float_array(rot, path, "the rotations", (3, 3))
    trans = np.zeros((len(rot), 2)) if trans is None else _float_array(trans, path, "the translations", (2,))
    if len(trans) != len(rot):
        raise InputError(f"holds {len(rot)} rotations but {len(trans)} translations", path)
    err = np.abs(np.einsum("nij,nkj->nik", rot, rot) - np.eye(3)).max(axis=(1, 2)) if len(rot) else rot
    det = np.linalg.det(rot) if len(rot) else rot
    bad = np.flatnonzero((err > 1e-3) | (det < 0)) if len(rot) else []
    if len(bad):
        raise InputError(f"rotation {int(bad[0])} is not a rotation matrix (|AAᵀ − I| = "
                         f"{err[bad[0]]:.3g}, det {det[bad[0]]:.3g})", path)
    return rot, trans


def read_ctf_pkl(path: str | os.PathLike, allow_pickle: bool) -> np.ndarray:
    """(N, 9) float64 from a cryoDRGN ``ctf.pkl`` (columns `CTF_PKL_COLUMNS`), with its values checked."""
    path = Path(path)
    ctf = _float_array(load_pickle(path, allow_pickle, "cryoDRGN ctf.pkl"), path, "it", (9,))
    checks = ((0, lambda v: (v >= 8) & (v == np.round(v)),
               "the box size D (column 1) must be an integer ≥ 8"),
              (1, lambda v: v > 0, "the pixel size (column 2) must be positive"),
              (5, lambda v: v > 0, "the voltage (column 6, kV) must be positive"),
              (7, lambda v: (v >= 0) & (v < 1), "the amplitude contrast (column 8) must be in [0, 1)"))
    for col, ok, what in checks:
        bad = np.flatnonzero(~ok(ctf[:, col]))
        if len(bad):
            raise InputError(f"row {int(bad[0])}: {what}, found {ctf[bad[0], col]:g}", path)
    return ctf


def read_index_pkl(path: str | os.PathLike, allow_pickle: bool) -> np.ndarray:
    """The int64 rows of a cryoDRGN index pickle (an array, or a list of ints), in the file's order."""
    path = Path(path)
    obj = load_pickle(path, allow_pickle, "cryoDRGN index pickle")
    if isinstance(obj, list | tuple):
        def is_int(v: object) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)

        if not all(is_int(v) for v in obj):
            bad = next(v for v in obj if not is_int(v))
            raise InputError(f"holds {bad!r} ({type(bad).__name__}), not an integer row index", path)
        return np.asarray([int(v) for v in obj], dtype=np.int64)
    if isinstance(obj, np.ndarray):
        if obj.dtype == np.bool_ or not np.issubdtype(obj.dtype, np.integer):
            raise InputError(f"holds {obj.dtype} values; expected integer row indices", path)
        return obj.astype(np.int64)
    raise InputError(f"holds a {type(obj).__name__}; a cryoDRGN index pickle holds an integer array or list",
                     path)
