"""Classical voxel reconstruction by Fourier back-projection, for validating what the network learned.

For each image (conventions in docs/architecture.md § Conventions): its centred transform F(k) is re-centred
by the particle's shift, F(k)·exp(-2πi k·t) (k cycles/px, t px of this box, RELION's origin sign), multiplied
by its CTF c(k), and inserted into a D³ Fourier grid at Aᵀ·(kx, ky, 0)·D voxels from the centre, spread over
the 8 neighbouring voxels with trilinear weights (or to the nearest voxel). The CTF² values are accumulated
the same way, and the volume is the inverse transform of

    V(k) = Σ c·F / (Σ c² + λ(k))

where λ is a "1/SNR" regulariser (a Wiener filter), chosen per resolution shell so nobody has to tune it:

- half maps (two disjoint halves of the particles, rlnRandomSubset when the table has it, else a seeded
  random split) use a small λ = ε·⟨Σc²⟩_shell that only tames voxels the data barely reached, so the
  gold-standard FSC between them measures the data, not the filter;
- the full map uses λ = ⟨Σc²⟩_shell / SNR(shell), with SNR = 2·FSC/(1-FSC) from the half-map FSC — the
  signal-to-noise ratio of the full data set in that shell. Shells without signal are suppressed, so the
  map is filtered at its own resolution.

Work is vectorised over batches of images with torch (CPU or GPU): one FFT per batch, one scatter-add
(`index_add_`) per batch into float64 accumulators, and only the Hermitian half of each image's lattice
is inserted (the other half follows by symmetry). Images are read in chunks, so memory stays bounded by
the D³ grids and one chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from drgn_core.fourier import fft2_center, ifftn_center, lattice_2d, radius_3d

HALF_MAP_EPS = 1e-2       # λ of the half maps, as a fraction of the shell's mean CTF² weight
SNR_FSC_CLIP = (1e-3, 0.999)  # half-map FSC values are clipped to this range before SNR = 2F/(1-F)
INSERT_ENTRIES_PER_BATCH = 4_000_000  # (images × points × corners) per scatter, bounds memory per batch


@dataclass
class FourierInserter:
    """Accumulates Σ c·F and Σ c² on `n_maps` D³ grids (e.g. two half maps) from batches of images.

    Images of real particles have Hermitian transforms, F(-k) = conj F(k), and the slice of -k lands at
    minus the grid position of k with mirrored trilinear weights. So only half of each image's lattice
    is inserted (ky > 0, or ky = 0 and kx > 0, plus the DC term at half weight) and `grids` adds the
    mirror image, conjugated: the same sums at half the cost.
    """

    D: int
    n_maps: int = 1
    interpolation: str = "trilinear"
    device: str = "cpu"
    acc: torch.Tensor = field(init=False, repr=False)
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.interpolation not in ("trilinear", "nearest"):
            raise ValueError(f"interpolation must be 'trilinear' or 'nearest', not {self.interpolation!r}")
        D = self.D
        lat = lattice_2d(D).reshape(-1, 2)                       # (D², 2) kx, ky in cycles/px
        inside = np.linalg.norm(lat, axis=1) * D < D / 2          # in-circle points only (no Nyquist row)
        half = (lat[:, 1] > 0) | ((lat[:, 1] == 0) & (lat[:, 0] >= 0))
        keep = inside & half
        self._pix = torch.as_tensor(np.nonzero(keep)[0], device=self.device)
        self._k = torch.as_tensor(lat[keep], dtype=torch.float64, device=self.device)  # (P, 2)
        dc = np.all(lat[keep] == 0, axis=1)
        self._point_weight = torch.as_tensor(np.where(dc, 0.5, 1.0), dtype=torch.float64, device=self.device)
        # [Σ Re(cF), Σ Im(cF), Σ c²] per voxel of each grid, (D+1)³ so upper corners need no bounds check
        self.acc = torch.zeros((self.n_maps * (D + 1) ** 3, 3), dtype=torch.float64, device=self.device)
        self.counts = np.zeros(self.n_maps, dtype=np.int64)

    @property
    def n_points(self) -> int:
        """Lattice points inserted per image (half of the in-circle points)."""
        return int(self._k.shape[0])

    def batch_size(self) -> int:
        """Images per scatter so that one batch needs about INSERT_ENTRIES_PER_BATCH entries."""
        corners = 8 if self.interpolation == "trilinear" else 1
        return max(1, INSERT_ENTRIES_PER_BATCH // (corners * self.n_points))

    def insert(self, images: np.ndarray, A: np.ndarray, shifts_px: np.ndarray | None,
               ctf_params: np.ndarray | None, which: np.ndarray | None = None) -> None:
        """Insert a batch: images (B, D, D) real, A (B, 3, 3), shifts (B, 2) px, CTF (B, 9) or None.

        `which` (B,) says which grid each image goes to (0 … n_maps-1; default 0). `ctf_params` holds the
        `drgn_core.ctf.CTF_COLUMNS` with the pixel size of these images in column 0; None means no CTF
        (c = 1), for projections.
        """
        from drgn_core.ctf import ctf_from_params

        D, dev = self.D, self.device
        B = images.shape[0]
        if B == 0:
            return
        which_np = np.zeros(B, dtype=np.int64) if which is None else np.asarray(which, dtype=np.int64)
        img = torch.as_tensor(np.ascontiguousarray(images), device=dev).to(torch.float64)
        F = fft2_center(img).reshape(B, D * D)[:, self._pix]     # (B, P) complex128
        k = self._k
        if shifts_px is not None:
            t = torch.as_tensor(np.asarray(shifts_px, dtype=np.float64), device=dev)   # (B, 2)
            F = F * torch.exp(-2j * math.pi * (t @ k.T))
        if ctf_params is not None:
            c = ctf_from_params(k, torch.as_tensor(np.asarray(ctf_params, dtype=np.float64), device=dev))
            F = F * c
            w = c * c
        else:
            w = torch.ones(F.shape, dtype=torch.float64, device=dev)
        values = torch.stack([F.real, F.imag, w], dim=-1) * self._point_weight[None, :, None]   # (B, P, 3)
        rot = torch.as_tensor(np.asarray(A, dtype=np.float64)[:, :2, :], device=dev)   # rows 0, 1 of A
        pos = (k * D) @ rot + D / 2                              # (B, P, 3): x, y, z grid coordinates
        # |k|·D < D/2 keeps pos inside (0, D): the lower corner is a valid index and the upper one at
        # most D, which the padded accumulator (D+1)³ absorbs; `grids` crops it away
        G = D + 1
        offset = torch.as_tensor(which_np * G**3, device=dev)[:, None]    # grid of each image
        if self.interpolation == "nearest":
            idx = torch.round(pos).long()
            flat = (idx[..., 2] * G + idx[..., 1]) * G + idx[..., 0] + offset
            self.acc.index_add_(0, flat.reshape(-1), values.reshape(-1, 3))
        else:
            base = torch.floor(pos)
            frac = pos - base
            base = base.long()
            flat = (base[..., 2] * G + base[..., 1]) * G + base[..., 0] + offset          # (B, P)
            fx, fy, fz = frac[..., 0], frac[..., 1], frac[..., 2]
            wx = torch.stack([1 - fx, fx])                                            # (2, B, P)
            wy = torch.stack([1 - fy, fy])
            wz = torch.stack([1 - fz, fz])
            wt = (wz[:, None, None] * wy[None, :, None] * wx[None, None, :]).reshape(8, *fx.shape)
            corner = torch.as_tensor([dz * G * G + dy * G + dx for dz in (0, 1) for dy in (0, 1)
                                      for dx in (0, 1)], device=dev)
            idx = flat[None] + corner[:, None, None]                                  # (8, B, P)
            self.acc.index_add_(0, idx.reshape(-1), (values[None] * wt[..., None]).reshape(-1, 3))
        self.counts += np.bincount(which_np, minlength=self.n_maps)

    def grids(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(Σ c·F complex128 (D, D, D), Σ c² float64 (D, D, D)) of grid i, indexed [z, y, x].

        The half-lattice sums plus their Hermitian mirror: voxel j ↔ D - j on every axis (index 0, the
        unpaired Nyquist plane, lies outside the sphere that `solve` keeps).
        """
        D, G = self.D, self.D + 1
        a = self.acc[i * G**3:(i + 1) * G**3].cpu().numpy().reshape(G, G, G, 3)[:D, :D, :D]
        num = a[..., 0] + 1j * a[..., 1]
        w = a[..., 2].copy()
        num_full, w_full = num.copy(), w.copy()
        num_full[1:, 1:, 1:] += np.conj(num[1:, 1:, 1:][::-1, ::-1, ::-1])
        w_full[1:, 1:, 1:] += w[1:, 1:, 1:][::-1, ::-1, ::-1]
        return num_full, w_full


def _shell_of_voxel(D: int) -> np.ndarray:
    """Integer radius floor(|k|·D) of each voxel of a centred D³ transform."""
    return np.floor(radius_3d(D)).astype(np.int64)


def shell_mean(values: np.ndarray) -> np.ndarray:
    """Mean of `values` (D, D, D) over each integer shell floor(|k|·D) = s, s = 0 … D/2-1, as (D/2,)."""
    D = values.shape[0]
    s = _shell_of_voxel(D).ravel()
    keep = s < D // 2
    tot = np.bincount(s[keep], weights=values.ravel()[keep], minlength=D // 2)
    cnt = np.bincount(s[keep], minlength=D // 2)
    return tot / np.maximum(cnt, 1)


def _per_voxel(per_shell: np.ndarray, D: int) -> np.ndarray:
    """Broadcast a per-shell array (D/2,) to the D³ grid (voxels beyond the last shell take its value)."""
    s = np.minimum(_shell_of_voxel(D), len(per_shell) - 1)
    return per_shell[s]


def solve(num: np.ndarray, weight: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Real volume (D, D, D) float32 from Σc·F, Σc² and the regulariser λ (all D³), inside Nyquist."""
    D = num.shape[0]
    denom = weight + reg
    vol_ft = np.divide(num, denom, out=np.zeros_like(num), where=denom > 0)  # no data, no signal
    vol_ft[radius_3d(D) >= D / 2] = 0
    return ifftn_center(vol_ft, 3).real.astype(np.float32)


def wiener_reg(weight: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """Per-voxel Wiener regulariser λ = mean weight / SNR per shell (at least HALF_MAP_EPS × the mean
    weight), for `solve`: the one filter of the full map, the Wiener-filtered half maps and the search's
    soft references."""
    mean_w = shell_mean(weight)[: len(snr)]
    return _per_voxel(np.maximum(mean_w / snr, HALF_MAP_EPS * mean_w), weight.shape[0])


def snr_from_half_fsc(fsc_half: np.ndarray) -> np.ndarray:
    """Per-shell SNR of the full data set from the half-map FSC: FSC_full = 2F/(1+F), SNR = 2F/(1-F)."""
    f = np.clip(fsc_half, *SNR_FSC_CLIP)
    return 2 * f / (1 - f)


def fsc_shell_to_radius(fsc: np.ndarray) -> np.ndarray:
    """Re-index an FSC curve (entry r = shell r-1 ≤ |k|·D < r) by integer radius s = floor(|k|·D)."""
    return np.asarray(fsc)[1:].copy() if len(fsc) > 1 else np.ones(1)


@dataclass
class Reconstruction:
    """Result of `reconstruct`: maps (float32 D³), the gold-standard FSC and bookkeeping."""

    map: np.ndarray
    half1: np.ndarray
    half2: np.ndarray
    freq: np.ndarray
    fsc: np.ndarray
    fsc_masked: np.ndarray
    mask: np.ndarray
    apix: float
    n_half: tuple[int, int]
    split: str
    # with reconstruct(..., wiener_halves=True): each half map Wiener-filtered by the half-set SNR, the
    # references for scoring the OTHER half's images without their own noise in them (abinit.classes)
    halves_wiener: tuple[np.ndarray, np.ndarray] | None = None


def split_halves(table_rows: np.ndarray, random_subset: np.ndarray | None, seed: int) -> np.ndarray:
    """0/1 half of each selected particle: rlnRandomSubset (1/2) when given, else a seeded even split.

    The seeded split depends only on the number of particles and the seed (sizes differ by at most one).
    """
    n = len(table_rows)
    if random_subset is not None:
        return (np.asarray(random_subset, dtype=np.int64) - 1).astype(np.int64)
    rng = np.random.default_rng(seed)
    half = np.zeros(n, dtype=np.int64)
    half[rng.permutation(n)[n // 2:]] = 1
    return half


def reconstruct(read: Callable[[np.ndarray], np.ndarray], n: int, D: int, apix: float, poses: np.ndarray,
                shifts_px: np.ndarray, ctf_params: np.ndarray | None, halves: np.ndarray,
                split: str = "", interpolation: str = "trilinear", device: str = "cpu",
                chunk: int = 1024, progress: bool = True, wiener_halves: bool = False) -> Reconstruction:
    """Back-project n images into two half maps and a Wiener-filtered full map (and, with
    `wiener_halves`, each half map Wiener-filtered by its own SNR, FSC/(1 - FSC)).

    `read(positions)` returns float32 images (len, D, D) for positions 0 … n-1 of the selection, in
    order (the caller maps them to table rows); poses (n, 3, 3), shifts (n, 2) px of this box, CTF
    (n, 9) with column 0 = `apix` (or None), halves (n,) 0/1. Images are read `chunk` at a time.
    """
    from drgn_core.fsc import fsc_curve, paper_mask
    from drgn_core.progress import progress_bar

    ins = FourierInserter(D, n_maps=2, interpolation=interpolation, device=device)
    bs = ins.batch_size()
    with progress_bar(total=n, desc="back-projecting", unit="img", disable=not progress) as bar:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            images = read(np.arange(start, stop))
            for b in range(0, stop - start, bs):
                sl = slice(start + b, min(stop, start + b + bs))
                ins.insert(images[b:b + bs], poses[sl], shifts_px[sl],
                           None if ctf_params is None else ctf_params[sl], halves[sl])
                bar.update(sl.stop - sl.start)

    (n1, w1), (n2, w2) = ins.grids(0), ins.grids(1)
    half1 = solve(n1, w1, _per_voxel(HALF_MAP_EPS * shell_mean(w1), D))
    half2 = solve(n2, w2, _per_voxel(HALF_MAP_EPS * shell_mean(w2), D))
    freq, fsc = fsc_curve(half1, half2)

    num, weight = n1 + n2, w1 + w2
    full = solve(num, weight, wiener_reg(weight, snr_from_half_fsc(fsc_shell_to_radius(fsc))))

    filtered = None
    if wiener_halves:
        f = np.clip(fsc_shell_to_radius(fsc), *SNR_FSC_CLIP)
        filtered = tuple(solve(nh, wh, wiener_reg(wh, f / (1 - f))) for nh, wh in ((n1, w1), (n2, w2)))

    mask = paper_mask(full, apix)
    _, fsc_masked = fsc_curve(half1 * mask, half2 * mask)
    return Reconstruction(full, half1, half2, freq, fsc, fsc_masked, mask, apix,
                          (int(ins.counts[0]), int(ins.counts[1])), split, filtered)


def _halves_for(table, rows: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """Half assignment of the selected rows: the table's rlnRandomSubset when usable, else a seeded split."""
    from drgn_core.errors import InputError

    p = table.particles
    if "rlnRandomSubset" in p:
        sub = p["rlnRandomSubset"].to_numpy()[rows]
        try:
            sub = sub.astype(np.int64)
        except (TypeError, ValueError):
            raise InputError("rlnRandomSubset holds non-integer values (expected 1 or 2)",
                             table.path) from None
        if not np.isin(sub, (1, 2)).all():
            bad = sorted(set(np.unique(sub).tolist()) - {1, 2})
            raise InputError(f"rlnRandomSubset holds {bad} (expected 1 or 2)", table.path)
        if (sub == 1).any() and (sub == 2).any():
            return split_halves(rows, sub, seed), "rlnRandomSubset"
    return split_halves(rows, None, seed), f"random (seed {seed})"


def backproject_table(table, stack_path=None, indices: np.ndarray | None = None, seed: int = 0,
                      interpolation: str = "trilinear", device: str = "cpu", chunk: int = 1024,
                      progress: bool = True) -> Reconstruction:
    """Reconstruct the particles `indices` (canonical rows; default all) of `table`.

    Images come from our downsampled stack `stack_path` (rows = table rows; its D and pixel size), or
    from the original images when `stack_path` is None. Rows are read in ascending order, so a memory-
    mapped stack is read front to back; the sum does not depend on the order.
    """
    from drgn_core.errors import InputError

    rows = np.arange(len(table)) if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
    if rows.size < 2:
        raise InputError(f"needs at least 2 particles for two half maps, got {rows.size}", table.path)
    if stack_path is not None:
        from drgn_core.io.stack import open_stack

        stack = open_stack(stack_path, table)  # checks rows, original box and pixel size against the table
        D, apix = int(stack.D), float(stack.apix)
        images = stack.images

        def read(pos: np.ndarray) -> np.ndarray:
            return np.asarray(images[rows[pos]], dtype=np.float32)
    else:
        from drgn_core.io.images import ImageSource

        D, apix = int(table.box), float(table.apix)
        source = ImageSource(table)  # resolves the stack paths once, keeps recently used stacks mapped

        def read(pos: np.ndarray) -> np.ndarray:
            return source.read(rows[pos])

    sub = table.subset(rows)
    halves, split = _halves_for(table, rows, seed)
    return reconstruct(read, rows.size, D, apix, sub.poses(), sub.shifts_px(apix), sub.ctf_params(apix),
                       halves, split=split, interpolation=interpolation, device=device, chunk=chunk,
                       progress=progress)


def write_reconstruction(rec: Reconstruction, outdir, lowpass_A: float | None = None,
                         extra: dict | None = None) -> dict:
    """Write map.mrc (low-passed if asked), half1.mrc, half2.mrc, fsc.json and fsc.png into `outdir`."""
    import json
    from pathlib import Path

    from drgn_core.fsc import fsc_report, plot_fsc
    from drgn_core.io.atomic import atomic_path
    from drgn_core.io.mrc import write_mrc

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    from drgn_core.volumes import lowpass

    full = rec.map if lowpass_A is None else lowpass(rec.map, rec.apix, lowpass_A)
    D = rec.map.shape[0]
    report = {
        "n_particles": int(sum(rec.n_half)), "n_half1": rec.n_half[0], "n_half2": rec.n_half[1],
        "split": rec.split, "D": D, "apix": rec.apix, "lowpass_A": lowpass_A,
        **fsc_report(rec.freq, rec.fsc, rec.apix),
        "masked": {"mask": "paper (from map.mrc before any low-pass)",
                   **fsc_report(rec.freq, rec.fsc_masked, rec.apix)},
        "freq_cycles_per_px": rec.freq.tolist(), "freq_per_A": (rec.freq / rec.apix).tolist(),
        "fsc": rec.fsc.tolist(), "fsc_masked": rec.fsc_masked.tolist(),
        **(extra or {}),
    }
    write_mrc(outdir / "map.mrc", full, rec.apix)
    write_mrc(outdir / "half1.mrc", rec.half1, rec.apix)
    write_mrc(outdir / "half2.mrc", rec.half2, rec.apix)
    curves = {"half maps, unmasked": (rec.freq, rec.fsc),
              "half maps, paper mask": (rec.freq, rec.fsc_masked)}
    plot_fsc(curves, rec.apix, outdir / "fsc.png",
             title=f"GSFSC, {report['n_particles']} particles: {report['resolution_0.143_A']:.2f} Å at 0.143")
    with atomic_path(outdir / "fsc.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report
