"""The run directory of `drgn train`: everything later stages read from it, defined once.

A run directory holds `model.pt`, `z.npy` (latent means), `indices.npy` (the canonical table rows z is
aligned to) and, when training held particles out, `val_indices.npy` (see docs/architecture.md, "Run
directory"). `drgn analyze`, `drgn filter`, `drgn traverse`, `drgn evaluate` and `drgn volumes` all read
runs through this module, so a change to the layout is made here and nowhere else:

- `load_run(run_dir) -> RunLatents`: z and its canonical rows, checked against each other;
- `held_out_mask(run_dir, indices)`: which of those rows training never fitted;
- `resolve_device(name)`: 'auto' / 'cpu' / 'cuda[:i]' → torch.device, refusing a GPU that is absent;
- `run_model(run_dir, device)`: the trained model, loaded once per run and device (a small cache, so an
  analysis that decodes several volume series reads the weights once);
- `decode_volumes(run_dir, z, D, device) -> (vols, voxel size)`: THE decode function — density maps at
  latent points, in memory;
- `write_volumes(run_dir, z, outdir, ...)`: `decode_volumes` in batches of 8 (memory-mapped scratch for
  long series), optional low-pass / hand flip, written as a `vol_NNN.mrc` series with `z_values.txt`.

`drgn_core.models.generate_volumes(model, cfg, z)` is the decoder arithmetic on a model object; this
module is the only caller of it outside tests and benchmarks. Index files (indices.npy, val_indices.npy)
are read with `drgn_core.io.indices.read_index_file`, like every other index file.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from drgn_core.errors import DrgnError, InputError
from drgn_core.io.indices import read_index_file

if TYPE_CHECKING:
    import torch

    from drgn_core.models import HetVAE, ModelConfig

DECODE_BATCH = 8  # volumes decoded per model call when writing a series


# ---- the run's latents ----------------------------------------------------------------------------------
@dataclass
class RunLatents:
    """The latent means of a training run and the canonical table rows they belong to."""

    run_dir: Path
    z: np.ndarray            # (N, zdim) float32
    indices: np.ndarray      # (N,) int64 canonical rows: z[i] is the latent of table row indices[i]

    @property
    def n(self) -> int:
        return len(self.z)

    @property
    def zdim(self) -> int:
        return int(self.z.shape[1])


def _require(path: Path) -> Path:
    if not path.exists():
        raise InputError("no such file (is the folder a finished drgn train run directory?)", path)
    return path


def read_npy(path: str | os.PathLike, n_rows: int | None = None, what: str = "") -> np.ndarray:
    """A plain (never pickled) `.npy` array of a run or its analysis, with one-line errors naming the file.

    `n_rows` checks the row count against the run's particles (`what` names the array in the message), so
    an embedding or label file from another run is refused instead of colouring the wrong particles.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file", path)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # a truncated file, pickled objects, or not .npy at all
        raise InputError(f"cannot read as a numpy .npy array ({type(e).__name__}: {e})", path) from None
    if n_rows is not None and len(arr) != n_rows:
        raise InputError(f"has {len(arr)} rows but the run has {n_rows} particles ({what})", path)
    return arr


def load_run(run_dir: str | os.PathLike) -> RunLatents:
    """Read `z.npy` and `indices.npy` of a `drgn train` run, checking they agree.

    indices.npy is required rather than assumed to be 0..N-1: a run trained on a filtered subset has
    latents for some rows only, and guessing would silently attach latents to the wrong particles.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError("no such run directory", run_dir)
    zpath = _require(run_dir / "z.npy")
    z = read_npy(zpath)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or not np.issubdtype(z.dtype, np.number) or z.shape[0] == 0:
        raise InputError(f"expected an (N, zdim) numeric array with N > 0, got shape {z.shape} and dtype "
                         f"{z.dtype}", zpath)
    if z.shape[1] == 0:
        raise InputError("the run has zdim = 0 (a homogeneous reconstruction): there is no latent space to "
                         "analyse", zpath)
    bad = ~np.isfinite(z).all(axis=1)
    if bad.any():
        raise InputError(f"{int(bad.sum())} latent rows are NaN or infinite (first: row "
                         f"{int(np.argmax(bad))}); the training diverged", zpath)
    ipath = _require(run_dir / "indices.npy")
    ind = read_index_file(ipath)
    if len(ind) != len(z):
        raise InputError(f"has {len(ind)} rows but z.npy has {len(z)}; they must be aligned", ipath)
    return RunLatents(run_dir, np.ascontiguousarray(z, dtype=np.float32), ind)


def held_out_mask(run_dir: str | os.PathLike, indices: np.ndarray) -> np.ndarray | None:
    """Mask of the run's rows held out of training (its val_indices.npy; with --train-subset, every row
    not in its train_indices.npy), or None when there are none.

    Held-out particles have latents (z.npy covers every row) from an encoder that never saw them; at the
    sizes measured (up to 20,000 images) those latents are close to noise, so analyses name them.
    """
    trained = Path(run_dir) / "train_indices.npy"
    if trained.exists():
        held = ~np.isin(indices, read_index_file(trained))
        return held if held.any() else None
    path = Path(run_dir) / "val_indices.npy"
    if not path.exists():
        return None
    val = read_index_file(path, allow_empty=True)
    if len(val) == 0:
        return None
    return np.isin(indices, val)


# ---- device and model ---------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """torch device for a --device option: 'auto' picks CUDA when present, else the CPU.

    A named CUDA device on a machine without one is refused here, in one line, rather than deep inside
    the first tensor transfer.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DrgnError(f"--device {name}: no CUDA GPU is available (use --device cpu or auto)")
    return dev


_MODEL_CACHE: dict[str, tuple[HetVAE, ModelConfig]] = {}


def run_model(run_dir: str | os.PathLike, device: str = "auto") -> tuple[HetVAE, ModelConfig]:
    """The run's trained model on `device`, in eval mode; the last one loaded is kept for the next call.

    One entry only: stages decode from one run at a time, and a second model would double GPU memory.
    """
    from drgn_core.models import load_model

    dev = resolve_device(device)
    key = f"{Path(run_dir).resolve()}::{dev}"
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load_model(run_dir, device=dev)
    return _MODEL_CACHE[key]


# ---- volumes ------------------------------------------------------------------------------------------
def decode_volumes(run_dir: str | os.PathLike, z: np.ndarray | None, D: int | None = None,
                   device: str = "auto") -> tuple[np.ndarray, float]:
    """Density maps at latent points → (vols (m, D, D, D) float32, voxel size Å).

    z is (m, zdim); for a homogeneous model (zdim = 0) pass None and get one map. D defaults to the
    training box; the voxel size is the training pixel size × D_train / D, so a map at another sampling
    keeps its physical size.
    """
    import torch

    from drgn_core.models import generate_volumes

    model, cfg = run_model(run_dir, device)
    D_out = int(D or cfg.D)
    if D_out % 2 or D_out < 4:
        raise DrgnError(f"-D must be an even box size >= 4, got {D_out}")
    if cfg.zdim == 0:
        zs = None
    else:
        if z is None:
            raise DrgnError(f"the model has zdim = {cfg.zdim}: give latent values")
        zs = np.asarray(z, dtype=np.float32).reshape(-1, cfg.zdim)
    with torch.inference_mode():
        vols = generate_volumes(model, cfg, zs, D=D_out)
    return vols, float(cfg.apix) * cfg.D / D_out


def write_volumes(run_dir: str | os.PathLike, z: np.ndarray | None, outdir: str | os.PathLike,
                  D: int | None = None, apix: float | None = None, lowpass_A: float | None = None,
                  flip: bool = False, prefix: str = "vol", device: str = "auto",
                  max_ram_bytes: int = 1 << 30) -> list[Path]:
    """Decode latent points and write them as `outdir/prefix_000.mrc`, … plus `z_values.txt`.

    Volumes are decoded 8 at a time; a long series whose volumes would exceed `max_ram_bytes` is
    collected in a temporary memory-mapped file instead of RAM, so a 500-frame trajectory at D = 256
    needs disk, not 33 GB of memory. `apix` overrides the recorded voxel size; `lowpass_A` and `flip`
    are applied to each volume (drgn volumes --lowpass / --flip). Returns the volume paths.
    """
    from drgn_core.progress import progress_bar
    from drgn_core.volumes import flip_hand, lowpass, write_volume_series

    outdir = Path(outdir)
    zs = None if z is None else np.asarray(z, dtype=np.float32).reshape(len(z), -1)
    first, vox = decode_volumes(run_dir, None if zs is None else zs[:DECODE_BATCH], D=D, device=device)
    vox = float(apix) if apix else vox

    def finish(vols: np.ndarray) -> np.ndarray:
        if lowpass_A:
            vols = np.stack([lowpass(v, vox, lowpass_A) for v in vols])
        return flip_hand(vols) if flip else vols

    m, D_out = (len(first) if zs is None else len(zs)), first.shape[-1]
    if zs is None or m == 0:
        return write_volume_series(finish(first), zs, outdir, vox, prefix)
    with tempfile.TemporaryDirectory(dir=outdir.parent if outdir.parent.exists() else None) as scratch:
        if m * D_out**3 * 4 > max_ram_bytes:
            buf = np.lib.format.open_memmap(Path(scratch) / "vols.npy", mode="w+", dtype=np.float32,
                                            shape=(m, D_out, D_out, D_out))
        else:
            buf = np.empty((m, D_out, D_out, D_out), dtype=np.float32)
        buf[:len(first)] = finish(first)
        for a in progress_bar(range(DECODE_BATCH, m, DECODE_BATCH), desc=f"volumes {outdir.name}",
                              unit="batch", file=sys.stderr, disable=m <= 2 * DECODE_BATCH):
            buf[a:a + DECODE_BATCH] = finish(decode_volumes(run_dir, zs[a:a + DECODE_BATCH], D=D,
                                                            device=device)[0])
        paths = write_volume_series(buf, zs, outdir, vox, prefix=prefix)
        del buf
    return paths
