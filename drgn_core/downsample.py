"""`drgn downsample`: the table's original images → one Fourier-cropped stack ``particles.{D}.mrcs``.

Training cost grows with D² per image, so every stage after import works on a downsampled copy made
once (docs/architecture.md § Data path and scale). Cropping the centred transform to D×D keeps every frequency
below the new Nyquist exactly and removes everything above it, with no interpolation; the pixel size becomes
apix0·D0/D.

Optics groups that differ in pixel size and/or box (sessions merged from several collections: 1.24 and
1.25 Å/px, say) are brought onto one common grid here, so that nothing downstream ever sees more than one
pixel size. A Fourier crop (or pad) keeps the physical extent of an image and changes only its sampling,
so group g, cut first to a centred real-space window of P_g of its own pixels, becomes a D-pixel image at
P_g·apix_g/D Å/px, exactly. Every group gets the same pixel size when all windows span the same extent
L = P_g·apix_g. P_g must be a whole number, so `plan_resampling` searches the extents L at most
`MAX_WINDOW_CROP` below the smallest group's box for the one whose windows agree best; what is left over
(a relative pixel-size residual ε) is recorded and bounded:

- ε stretches a group's images about the box centre by ε, which moves a feature at the edge of the D-pixel
  output by ε·D/2 px, a phase error of π·ε·D/2 at the output's Nyquist. `RESIDUAL_LIMIT_PX` is a quarter
  pixel (a phase error of at most π/4 at Nyquist, at the box edge; less inside the particle). Rounding a
  window to a whole pixel leaves at most half an original pixel over the window, so ε·D/2 ≤ D/(4·P_g):
  within the limit whenever D ≤ P_g. The limit is met only by -D at or just above a window (allowed by
  the pad limit below); it is refused with the figures and the largest -D that passes.
- A group whose window is smaller than D would be Fourier-padded: the output would ask it for
  frequencies beyond its own Nyquist, which it does not hold. Up to `MAX_PAD_PX` per edge (the outermost
  ring of the output's spectrum, where the CTF envelope has left no signal) is allowed; more is refused,
  with the largest -D that needs no more. This is the limit that a wide spread in pixel size meets: a
  coarser group cannot be made as fine as a finer one. 1.24 and 1.25 Å/px pass at every -D up to the box
  for boxes up to 256 px, and up to box − 2 px beyond (the 1.25 Å group's window is smaller by 1 %).

Real-space windows only ever crop (L never exceeds a group's box), so no group is padded with invented
pixels. The stack's JSON sidecar records, per group, the original pixel size and box, the window, the
scale factor D/P_g and the resulting pixel size; the canonical table keeps each group's original values.

The images stream from the user's stacks in chunks (`ImageSource`, sign applied) into a memory-mapped
output under a temporary name, so memory stays bounded by the chunk and a failed run leaves nothing behind.
Every image is checked on the way (NaN, infinite or all-zero images stop the run, naming the user's stack
and the image's 1-based number in it). The result is renamed into place and its JSON sidecar
(`drgn_core.io.stack`) written last, so a sidecar always describes a complete stack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from drgn_core.errors import InputError
from drgn_core.io.stack import ParticleStack, open_stack, sidecar_dict, sidecar_path, write_sidecar
from drgn_core.io.table import ParticleTable

if TYPE_CHECKING:
    from drgn_core.io.images import ImageSource

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


def resample_matrix(D0: int, window: int, D: int) -> np.ndarray:
    """(D, D0) float64 matrix M of the 1D resampling: centred window of `window` samples, Fourier crop or
    pad to D (even), pixel values kept. A stack of images X (…, D0, D0) becomes M·X·Mᵀ.

    Built column by column from the exact centred DFT (origin D0//2 → window//2 → D//2), so any window
    size works, odd included; a matrix product instead of an FFT also avoids the slow FFTs of prime sizes
    that the windows of mixed optics groups often are. A crop keeps |k| < D/2 and gives the new Nyquist
    term the mean of the old ±D/2 terms (as `fourier_crop_real` does, axis by axis); a pad of an even
    window splits its Nyquist term equally between ±window/2, the real band-limited interpolant.
    """
    P, h = window, D // 2
    n = np.arange(P) - P // 2
    if D < P:
        k = np.arange(-h, h + 1)                     # -h..h: ±h are folded into the output's -h
        keep = np.ones(len(k))
        keep[[0, -1]] = 0.5
        out_k = np.where(k == h, -h, k)
    else:
        q = P // 2
        k = np.arange(-q, P - q)                     # the window's own frequencies
        keep = np.ones(len(k))
        if P % 2 == 0:                               # old Nyquist -q: half to -q, half to +q
            k = np.append(k, q)
            keep = np.append(keep, 0.5)
            keep[0] = 0.5
        out_k = k
    F = np.exp(-2j * np.pi * np.outer(k, n) / P)      # centred DFT rows at frequencies k (P samples)
    m = np.arange(D) - h
    E = np.exp(2j * np.pi * np.outer(m, out_k) / D) / D  # inverse centred DFT from those frequencies
    M = (E * keep) @ F
    full = np.zeros((D, D0))
    a = D0 // 2 - P // 2
    full[:, a:a + P] = M.real * (D / P)
    return full


_MATRICES: dict[tuple[int, int, int], torch.Tensor] = {}


def fft_friendly(P: int) -> bool:
    """An even size with no prime factor above 7: its FFT crop is about as fast as `resample_matrix`'s
    product or faster; other sizes are not (a 254-px window, 2·127, is 2× slower through the FFT)."""
    if P % 2:
        return False
    for f in (2, 3, 5, 7):
        while P % f == 0:
            P //= f
    return P == 1


def fourier_resize_real(images: torch.Tensor, D: int, window: int | None = None) -> torch.Tensor:
    """Real images (..., D0, D0) → centred `window` (default D0) → Fourier crop or pad to an even D.

    The common case, an even window equal to D0 and D ≤ D0, is `fourier_crop_real` (an FFT). Otherwise
    it is the matrix product of `resample_matrix`, exact for any window (odd windows, pads).
    """
    D0 = images.shape[-1]
    P = D0 if window is None else window
    if P == D0 and P % 2 == 0 and D <= P:
        return fourier_crop_real(images, D)
    if fft_friendly(P) and D <= P:
        a = D0 // 2 - P // 2  # the origin D0//2 lands on P//2
        return fourier_crop_real(images[..., a:a + P, a:a + P].contiguous(), D)
    key = (D0, P, D)
    if key not in _MATRICES:
        _MATRICES[key] = torch.from_numpy(resample_matrix(D0, P, D))
    M = _MATRICES[key].to(images.dtype)
    return torch.matmul(torch.matmul(M, images), M.T)


# Limits of what resampling may hide (module docstring): see `plan_resampling`.
RESIDUAL_LIMIT_PX = 0.25  # largest stretch ε·D/2 (px at the output's box edge) left after the windows
RESIDUAL_GOAL_PX = 0.02   # a residual this small counts as exact: prefer the largest such window
MAX_PAD_PX = 1            # largest Fourier pad per edge (output px beyond a group's own Nyquist)
MAX_WINDOW_CROP = 0.05    # windows may cut at most 5 % off the smallest group's box to agree better


@dataclass(frozen=True)
class GroupResampling:
    """What downsampling does to one optics group: window P px of the original, then Fourier-resize to D."""

    group: int      # rlnOpticsGroup
    apix0: float    # original pixel size, Å
    D0: int         # original box, px
    window: int     # centred real-space window, px of the original (= D0 when nothing is cut)
    D: int          # output box
    n: int          # particles in the group

    @property
    def scale(self) -> float:
        """Fourier crop (< 1) or pad (> 1) factor D / window: output px per original px."""
        return self.D / self.window

    @property
    def apix(self) -> float:
        """Pixel size of this group's output images, Å (window·apix0/D)."""
        return self.window * self.apix0 / self.D

    def record(self, common_apix: float) -> dict:
        return {"optics_group": self.group, "apix0": self.apix0, "D0": self.D0, "window": self.window,
                "scale": self.scale, "apix": self.apix, "residual": self.apix / common_apix - 1, "n": self.n}


@dataclass(frozen=True)
class ResamplingPlan:
    """Every group's resampling onto one D-pixel grid at one pixel size `apix` (the common extent / D)."""

    D: int
    extent: float                       # common physical box, Å
    groups: tuple[GroupResampling, ...]

    @property
    def apix(self) -> float:
        return self.extent / self.D

    @property
    def mixed(self) -> bool:
        """True when the groups differ in pixel size or box (the sidecar then lists them)."""
        return len({(round(g.apix0, 6), g.D0) for g in self.groups}) > 1

    @property
    def residual_px(self) -> float:
        """Largest stretch left after the windows, in px at the edge of the output box."""
        return max(abs(g.apix / self.apix - 1) for g in self.groups) * self.D / 2


def _groups(table: ParticleTable) -> list[tuple[int, float, int, int]]:
    """(group, apix0, D0, n) of each optics group that has particles, in data_optics order."""
    og = table.particles["rlnOpticsGroup"].to_numpy()
    counts = dict(zip(*np.unique(og, return_counts=True)))
    table.pixel_sizes()  # raises the table's own error for a particle in an undefined group
    o = table.optics
    return [(int(g), float(a), int(d), int(counts[g]))
            for g, a, d in zip(o["rlnOpticsGroup"], o["rlnImagePixelSize"], o["rlnImageSize"]) if g in counts]


def check_target_size(table: ParticleTable, D: int) -> None:
    """-D must be even and positive; the rest is `plan_resampling`'s."""
    if D < 2 or D % 2:
        raise InputError(f"-D {D}: the new box must be an even number ≥ 2", table.path)


def plan_resampling(table: ParticleTable, D: int) -> ResamplingPlan:
    """How each optics group reaches the common D-pixel grid; refuses what resampling cannot hide.

    One pixel size and box (the usual case): nothing is cut, apix = apix0·D0/D, and D may not exceed D0.
    Several: the common extent L is the one, among L = P·apix_g for whole windows P within
    `MAX_WINDOW_CROP` of the smallest group's box, whose windows round(L/apix_h) agree best; among those
    under `RESIDUAL_GOAL_PX` (practically exact), the largest L (the least cut off). 1.24 and 1.25 Å at
    256 px: windows 256 and 254 px (ε 1.9e-4, 0.012 px at the edge of a 128-px image).
    """
    check_target_size(table, D)
    groups = _groups(table)
    if len(groups) == 0:
        raise InputError("holds no particles", table.path)
    if len({(round(a, 6), d) for _, a, d, _ in groups}) == 1:
        D0, apix0 = groups[0][2], groups[0][1]
        if D > D0:
            raise InputError(f"-D {D} is larger than the original box {D0}; downsampling cannot upsample",
                             table.path)
        return ResamplingPlan(D, D0 * apix0,
                              tuple(GroupResampling(g, a, d, d, D, n) for g, a, d, n in groups))

    apix0 = np.array([a for _, a, _, _ in groups])
    D0 = np.array([d for _, _, d, _ in groups])
    L_min = float((apix0 * D0).min())
    best: tuple[tuple[bool, float, float], np.ndarray] | None = None  # (sort key, windows)
    for a in apix0:
        top = int(np.floor(L_min / a + 1e-9))
        for P in range(top, max(int(np.ceil(L_min * (1 - MAX_WINDOW_CROP) / a)), 1) - 1, -1):
            L = P * a
            win = np.minimum(D0, np.maximum(np.rint(L / apix0), 1)).astype(np.int64)
            resid = float(np.abs(win * apix0 / L - 1).max()) * D / 2
            padded = bool(((D - win) / 2 > MAX_PAD_PX).any())
            # Windows that need no more padding than allowed first; then the smallest residual; below
            # the goal, only the extent counts (the largest keeps the most of every image).
            key = (padded, max(resid, RESIDUAL_GOAL_PX), -L)
            if best is None or key < best[0]:
                best = (key, win)
    assert best is not None
    L = -best[0][2]
    plan = ResamplingPlan(D, L, tuple(GroupResampling(g, a, d, int(w), D, n)
                                      for (g, a, d, n), w in zip(groups, best[1])))
    _check_plan(plan, table)
    return plan


def _describe_groups(plan: ResamplingPlan) -> str:
    return ", ".join(f"{g.group} ({g.apix0:g} Å/px, {g.D0} px, n={g.n})" for g in plan.groups)


def _check_plan(plan: ResamplingPlan, table: ParticleTable) -> None:
    """Refuse, with the figures, a plan that would invent frequencies or leave a visible stretch; the
    suggested -D satisfies both limits for the windows found."""
    worst = max(plan.groups, key=lambda g: abs(g.apix / plan.apix - 1))
    eps = abs(worst.apix / plan.apix - 1)
    d_max = min(min(g.window for g in plan.groups) // 2 * 2 + 2 * MAX_PAD_PX,
                int(2 * RESIDUAL_LIMIT_PX / eps) // 2 * 2 if eps > 0 else plan.D)
    padded = [g for g in plan.groups if (plan.D - g.window) / 2 > MAX_PAD_PX]
    if padded:
        g = min(padded, key=lambda g: g.window)
        raise InputError(
            f"optics groups {_describe_groups(plan)} differ in pixel size by more than resampling can hide "
            f"at -D {plan.D}: group {g.group} holds nothing finer than {2 * g.apix0:.4g} Å (its Nyquist), "
            f"but a {plan.D}-px stack at the common {plan.apix:.4g} Å/px reaches {2 * plan.apix:.4g} Å, so "
            f"its {g.window}-px window would be Fourier-padded by {(plan.D - g.window) / 2:g} px per edge "
            f"(limit {MAX_PAD_PX}); use -D {d_max} or smaller", table.path)
    if plan.residual_px > RESIDUAL_LIMIT_PX:
        windows = ", ".join(f"{g.window}" for g in plan.groups)
        raise InputError(
            f"optics groups {_describe_groups(plan)} differ in pixel size by more than -D {plan.D} can hide: "
            f"the closest whole-pixel windows ({windows} px) still leave group {worst.group} "
            f"{eps * 100:.2g} % off the common {plan.apix:.4g} Å/px, which moves the edge of a {plan.D}-px "
            f"image by {plan.residual_px:.3g} px (limit {RESIDUAL_LIMIT_PX:g} px); use -D {d_max} or "
            "smaller", table.path)


def downsample_table(table: ParticleTable, D: int, out: str | os.PathLike, chunk: int = 1000,
                     float16: bool = False, max_threads: int | None = None, progress: bool = True
                     ) -> ParticleStack:
    """Write all of the table's images, Fourier-cropped to D, as `out` (+ its JSON sidecar).

    Optics groups of different pixel sizes or boxes are resampled onto one grid (`plan_resampling`).
    D = D0 copies the images (sign applied). Every image is checked (`_check_images`). Returns the opened
    stack. `max_threads` bounds torch's threads for the FFTs (restored afterwards).
    """
    from drgn_core.io.atomic import atomic_path, refuse_overwrite_input
    from drgn_core.io.images import ImageSource
    from drgn_core.io.mrc import new_mmap_stack
    from drgn_core.progress import progress_bar

    plan = plan_resampling(table, D)
    if chunk < 1:
        raise InputError(f"--chunk must be positive, got {chunk}", table.path)
    out = Path(out)
    src = ImageSource(table)
    refuse_overwrite_input([out, sidecar_path(out)], [*src.paths, *([table.path] if table.path else [])])
    # Row → its group's position in the plan (a single group: all zero, one read per chunk as before).
    group_ids = np.array([g.group for g in plan.groups])
    row_group = np.searchsorted(np.sort(group_ids), table.particles["rlnOpticsGroup"].to_numpy())
    row_group = np.argsort(group_ids, kind="stable")[row_group]
    big = max(plan.groups, key=lambda g: g.n)
    D0_label = f"{big.D0}" if not plan.mixed else "mixed"
    dtype = np.float16 if float16 else np.float32
    threads = torch.get_num_threads()
    if max_threads:
        torch.set_num_threads(max_threads)
    try:
        with atomic_path(out) as tmp:
            mrc = new_mmap_stack(tmp, len(table), D, plan.apix, dtype)
            stats = _RunningStats()
            try:
                with progress_bar(total=len(table), desc=f"downsample {D0_label}→{D}", unit="img",
                          disable=not progress) as bar:
                    for start in range(0, len(table), chunk):
                        rows = np.arange(start, min(start + chunk, len(table)))
                        codes = row_group[rows]
                        uniform = bool((codes == codes[0]).all())  # one group: one read, as before
                        for k in ([codes[0]] if uniform else np.unique(codes)):
                            part = rows if uniform else rows[codes == k]
                            _resample_rows(src, part, plan.groups[int(k)], mrc.data, stats, float16, table)
                        bar.update(len(rows))
                stats.write_header(mrc.header)
            finally:
                mrc.close()
                src.close()
            stale = sidecar_path(out)
            if stale.exists():  # a sidecar must never describe another stack, even for a moment
                stale.unlink()
        meta = sidecar_dict(D, plan.apix, big.D0, big.apix0, len(table), np.dtype(dtype).name, table.path)
        if plan.mixed:
            meta["groups"] = [g.record(plan.apix) for g in plan.groups]
            meta["extent_A"] = plan.extent
        write_sidecar(sidecar_path(out), meta)
    finally:
        torch.set_num_threads(threads)
    return open_stack(out)


def _resample_rows(src: ImageSource, rows: np.ndarray, g: GroupResampling, data: np.ndarray,
                   stats: _RunningStats, float16: bool, table: ParticleTable) -> None:
    """Read table `rows` (one optics group), window, Fourier-resize to D and store them in `data`."""
    images = src.read(rows)
    contiguous = len(rows) and rows[-1] - rows[0] == len(rows) - 1
    # FFT in sub-batches: the complex spectra stay cache-sized and bounded.
    for s in range(0, len(images), FFT_BATCH):
        x = images[s:s + FFT_BATCH]
        small = fourier_resize_real(torch.from_numpy(x), g.D, g.window).numpy()
        _check_images(small, x, rows[s:s + FFT_BATCH], src, table)
        if float16:
            _check_float16_range(small, int(rows[s]), table)
        if contiguous:
            data[rows[s]:rows[s] + len(small)] = small
        else:
            data[rows[s:s + len(small)]] = small
        stats.add(small)


def _check_images(small: np.ndarray, original: np.ndarray, rows: np.ndarray, src: ImageSource,
                  table: ParticleTable) -> None:
    """Stop at the first NaN, infinite or all-zero image, naming the user's stack and its 1-based number.

    Tested on the (smaller) output: a NaN or infinity anywhere in an image spreads over its whole Fourier
    crop, and an all-zero image stays zero; the original then says which it is.
    """
    lo, hi = small.min(axis=(1, 2)), small.max(axis=(1, 2))
    bad = np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi)) | ((lo == 0) & (hi == 0)))
    if not len(bad):
        return
    i = int(bad[0])
    img = original[i]
    if np.isnan(img).any():
        what = "contains NaN pixels"
    elif np.isinf(img).any():
        what = "contains infinite pixels"
    elif not img.any():
        what = "is all zeros"
    elif np.isfinite(small[i]).all():
        what = "is zero below the new Nyquist frequency (nothing is left of it at this -D)"
    else:
        what = f"holds values up to {float(np.abs(img).max()):g}, too large for a float32 Fourier transform"
    row = int(rows[i])
    stack = src.paths[int(src.codes[row])]
    raise InputError(f"image {int(src.indices[row]) + 1} {what} (particle table row {row}, 0-based); "
                     "remove that particle from the table, or repair the stack", stack)


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
