"""`drgn downsample`: the table's original images → one Fourier-cropped stack ``particles.{D}.mrcs``.

Training cost grows with D² per image, so every stage after import works on a downsampled copy made
once (docs/architecture.md § Data path and scale). Cropping the centred transform to D×D keeps every frequency
below the new Nyquist exactly and removes everything above it, with no interpolation; the pixel size becomes
apix0·D0/D.

The images stream from the user's stacks in chunks (`iter_image_chunks`, sign applied) into a
memory-mapped output under a temporary name, so memory stays bounded by the chunk and a failed run
leaves nothing behind. The result is renamed into place and its JSON sidecar (`drgn_core.io.stack`)
written last, so a sidecar always describes a complete stack.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from drgn_core.errors import InputError
from drgn_core.io.stack import ParticleStack, open_stack, sidecar_dict, sidecar_path, write_sidecar
from drgn_core.io.table import ParticleTable

FLOAT16_MAX = float(np.finfo(np.float16).max)
FFT_BATCH = 256  # images per FFT call


def fourier_crop_real(images: torch.Tensor, D: int) -> torch.Tensor:
    """Fourier-crop real images (..., D0, D0) to (..., D, D); equal to `drgn_core.fourier.downsample_images`
    (to rounding) but ~5× faster, because it works on the half spectrum of a real FFT.

    The centred crop keeps frequencies k ∈ [-D/2, D/2) on each axis and takes the real part of the inverse,
    which Hermitian-symmetrises the lone -D/2 row and column: they become the mean of the ±D/2 terms of
    the original spectrum. Written in terms of the uncentred real FFT R, the same half spectrum is built
    directly, and no fftshift is needed (for even sizes the shift factors (-1)^(kx+ky) of input and
    output cancel). Intensities are scaled by (D/D0)² as in `downsample_images`.
    """
    D0 = images.shape[-1]
    if D == D0:
        return images
    h = D // 2
    R = torch.fft.rfft2(images)
    ky = torch.cat([torch.arange(0, h), torch.arange(-h, 0)])  # the kept rows, in FFT order
    rows = ky % D0
    H = R[..., rows, : h + 1]                                    # advanced indexing: a copy
    H[..., h, :h] = (R[..., D0 - h, :h] + R[..., h, :h]) / 2     # row ky = -D/2
    H[..., :, h] = (torch.conj(R[..., (-ky) % D0, h]) + R[..., rows, h]) / 2  # column kx = ±D/2
    H[..., h, h] = R[..., h, h].real.to(R.dtype)                 # corner: its own mirror, real
    return torch.fft.irfft2(H, s=(D, D)) * (D / D0) ** 2


def check_target_size(table: ParticleTable, D: int) -> None:
    """-D must be even, positive and no larger than the original box."""
    D0 = table.box
    if D < 2 or D % 2:
        raise InputError(f"-D {D}: the new box must be an even number ≥ 2", table.path)
    if D > D0:
        raise InputError(f"-D {D} is larger than the original box {D0}; downsampling cannot upsample",
                         table.path)


def downsample_table(table: ParticleTable, D: int, out: str | os.PathLike, chunk: int = 1000,
                     float16: bool = False, max_threads: int | None = None, progress: bool = True
                     ) -> ParticleStack:
    """Write all of the table's images, Fourier-cropped to D, as `out` (+ its JSON sidecar).

    D = D0 copies the images (sign applied). Returns the opened stack. `max_threads` bounds torch's
    threads for the FFTs (restored afterwards).
    """
    from tqdm import tqdm

    from drgn_core.io.atomic import atomic_path, refuse_overwrite_input
    from drgn_core.io.images import ImageSource
    from drgn_core.io.mrc import new_mmap_stack

    check_target_size(table, D)
    if chunk < 1:
        raise InputError(f"--chunk must be positive, got {chunk}", table.path)
    out = Path(out)
    src = ImageSource(table)
    refuse_overwrite_input([out, sidecar_path(out)], [*src.paths, *([table.path] if table.path else [])])
    D0, apix0 = table.box, table.apix
    apix = apix0 * D0 / D
    dtype = np.float16 if float16 else np.float32
    threads = torch.get_num_threads()
    if max_threads:
        torch.set_num_threads(max_threads)
    try:
        with atomic_path(out) as tmp:
            mrc = new_mmap_stack(tmp, len(table), D, apix, dtype)
            stats = _RunningStats()
            try:
                with tqdm(total=len(table), desc=f"downsample {D0}→{D}", unit="img",
                          disable=not progress) as bar:
                    for start, images in src.chunks(chunk):
                        # FFT in sub-batches: the complex spectra stay cache-sized and bounded.
                        for s in range(0, len(images), FFT_BATCH):
                            small = fourier_crop_real(torch.from_numpy(images[s:s + FFT_BATCH]), D).numpy()
                            if float16:
                                _check_float16_range(small, start + s, table)
                            mrc.data[start + s:start + s + len(small)] = small
                            stats.add(small)
                            bar.update(len(small))
                stats.write_header(mrc.header)
            finally:
                mrc.close()
                src.close()
            stale = sidecar_path(out)
            if stale.exists():  # a sidecar must never describe another stack, even for a moment
                stale.unlink()
        meta = sidecar_dict(D, apix, D0, apix0, len(table), np.dtype(dtype).name, table.path)
        write_sidecar(sidecar_path(out), meta)
    finally:
        torch.set_num_threads(threads)
    return open_stack(out)


class _RunningStats:
    """min / max / mean / rms of everything written, accumulated per batch, for the MRC header (viewers
    use them for contrast) without a second pass over a stack larger than memory."""

    def __init__(self) -> None:
        self.n, self.total, self.total_sq = 0, 0.0, 0.0
        self.lo, self.hi = np.inf, -np.inf

    def add(self, x: np.ndarray) -> None:
        x64 = x.astype(np.float64, copy=False)
        self.n += x64.size
        self.total += float(x64.sum())
        self.total_sq += float(np.square(x64).sum())
        self.lo, self.hi = min(self.lo, float(x64.min())), max(self.hi, float(x64.max()))

    def write_header(self, header) -> None:
        if not self.n:
            return
        mean = self.total / self.n
        header.dmin, header.dmax, header.dmean = self.lo, self.hi, mean
        header.rms = np.sqrt(max(self.total_sq / self.n - mean * mean, 0.0))


def _check_float16_range(small: np.ndarray, start: int, table: ParticleTable) -> None:
    peak = float(np.abs(small).max()) if small.size else 0.0
    if peak > FLOAT16_MAX:  # (NaN pixels are import's business: drgn import --check-nan)
        raise InputError(f"images from row {start} on hold values up to {peak:g}, beyond float16's range "
                         f"(±{FLOAT16_MAX:g}); drop --float16", table.path)
