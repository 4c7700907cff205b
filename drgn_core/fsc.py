"""Fourier shell correlation between two maps, resolution read-outs and the paper's real-space mask.

Definitions (docs/architecture.md § Metrics on simulated data), shared by the map-to-map FSC (`drgn fsc`), the
gold-standard FSC of back-projected half maps (`drgn backproject`) and the per-image FSC of `drgn evaluate`,
so the three agree on what a number means:

- shells: voxel k of a D³ centred transform (|k|·D its distance from the DC term, in voxels) belongs to
  shell r when r-1 ≤ |k|·D < r, for r = 1 … D/2-1; FSC(0) = 1 by convention; shell r is reported at the
  frequency r/D cycles/px (r/(D·apix) Å⁻¹);
- FSC-AUC: trapezoid of |FSC| over those frequencies (the largest possible value is (D/2-1)/D);
- resolution at a threshold: the first crossing, interpolated linearly in frequency between the last
  shell at or above the threshold and the first one below it.

The paper's mask (Methods, "Map-to-map FSC"): threshold at half the 99.99th percentile of the map,
dilate by 25 Å, then taper to 0 with a soft cosine edge over the next 15 Å.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from drgn_core.fourier import fft3_center, radius_3d

PAPER_DILATE_A = 25.0
PAPER_EDGE_A = 15.0
PAPER_PERCENTILE = 99.99
EMPTY_SHELL_REL = 1e-20  # shells with less power than this (relative) hold only FFT round-off: FSC 0


@lru_cache(maxsize=8)
def _shell_index(D: int) -> np.ndarray:
    """Flat shell label per voxel of a centred D³ transform: shell r (1 … D/2-1) or 0 for "unused"."""
    r = radius_3d(D).ravel()
    shell = np.floor(r).astype(np.int64) + 1
    shell[shell > D // 2 - 1] = 0
    shell.setflags(write=False)
    return shell


def _as_volume(v, name: str) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor: compare on the CPU in float64
        v = v.detach().cpu().numpy()
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim != 3 or len(set(arr.shape)) != 1:
        raise ValueError(f"FSC needs a cubic volume (D, D, D), got {name} of shape {arr.shape}")
    return arr


def fsc_curve(v1, v2) -> tuple[np.ndarray, np.ndarray]:
    """FSC between two real volumes (D, D, D) (numpy or torch) → (freq in cycles/px, fsc), both (D/2,).

    freq[r] = r/D for r = 0 … D/2-1; fsc[0] = 1; fsc[r] is the normalised correlation of the two
    transforms over the voxels with r-1 ≤ |k|·D < r. A shell where either map has no power (below 1e-20 of
    the total, i.e. FFT round-off) gets 0.
    """
    a, b = _as_volume(v1, "v1"), _as_volume(v2, "v2")
    if a.shape != b.shape:
        raise ValueError(f"FSC needs volumes of the same size, got {a.shape} and {b.shape}")
    D = a.shape[0]
    n_shells = D // 2
    shell = _shell_index(D)
    F1, F2 = fft3_center(a).ravel(), fft3_center(b).ravel()
    cross = np.bincount(shell, weights=(F1 * F2.conj()).real, minlength=n_shells)
    p1 = np.bincount(shell, weights=np.abs(F1) ** 2, minlength=n_shells)
    p2 = np.bincount(shell, weights=np.abs(F2) ** 2, minlength=n_shells)
    denom = np.sqrt(p1 * p2)
    # a shell counts as empty when its power is at round-off level relative to the maps' total power
    floor = EMPTY_SHELL_REL * math.sqrt(p1.sum() * p2.sum())
    fsc = np.divide(cross, denom, out=np.zeros(n_shells), where=denom > floor)
    fsc[0] = 1.0
    freq = np.arange(n_shells) / D
    return freq, fsc


def fsc_auc(freq: np.ndarray, fsc: np.ndarray) -> float:
    """Area under |FSC| over frequency in cycles/px (trapezoid rule); a perfect curve gives (D/2-1)/D."""
    return float(np.trapezoid(np.abs(np.asarray(fsc)), np.asarray(freq)))


def crossing(freq: np.ndarray, fsc: np.ndarray, threshold: float, apix: float = 1.0) -> float:
    """Resolution (Å; px when apix = 1) where the FSC first drops below `threshold`.

    The frequency is interpolated linearly between the last shell at or above the threshold and the first
    shell below it. When the curve never drops below the threshold, the resolution of the last shell
    (2·apix·(D/2)/(D/2-1) ≈ Nyquist) is returned: the data support at least that, and no more can be
    measured in this box.
    """
    freq, fsc = np.asarray(freq, dtype=np.float64), np.asarray(fsc, dtype=np.float64)
    below = np.nonzero(fsc < threshold)[0]
    if below.size == 0:
        return float(apix / freq[-1])
    i = int(below[0])
    if i == 0:  # fsc[0] is 1 by definition, so this only happens for thresholds above 1
        return math.inf
    f0, f1, c0, c1 = freq[i - 1], freq[i], fsc[i - 1], fsc[i]
    f = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0)
    return float(apix / f) if f > 0 else math.inf


def paper_mask(vol: np.ndarray, apix: float, dilate_A: float = PAPER_DILATE_A,
               edge_A: float = PAPER_EDGE_A, percentile: float = PAPER_PERCENTILE) -> np.ndarray:
    """The cryoDRGN paper's loose mask for a map: float32 (D, D, D) in [0, 1].

    Voxels above half the 99.99th percentile of `vol` form the core; every voxel within `dilate_A` Å of
    the core is 1; beyond that the mask falls as a raised cosine to 0 at `dilate_A + edge_A` Å. Distances
    are exact Euclidean distances (scipy's distance transform), so the mask does not depend on how a
    dilation would be iterated voxel by voxel.
    """
    from scipy.ndimage import distance_transform_edt

    v = np.asarray(vol, dtype=np.float64)
    thresh = 0.5 * np.percentile(v, percentile)
    core = v > thresh
    if not core.any():  # a constant map: nothing stands out, so nothing is masked away
        return np.ones(v.shape, dtype=np.float32)
    dist = distance_transform_edt(~core, sampling=apix)
    mask = np.zeros(v.shape, dtype=np.float64)
    mask[dist <= dilate_A] = 1.0
    if edge_A > 0:
        ramp = (dist > dilate_A) & (dist < dilate_A + edge_A)
        mask[ramp] = 0.5 * (1.0 + np.cos(np.pi * (dist[ramp] - dilate_A) / edge_A))
    return mask.astype(np.float32)


def fsc_report(freq: np.ndarray, fsc: np.ndarray, apix: float) -> dict:
    """The read-outs every FSC JSON carries: 0.5 and 0.143 crossings (Å) and the AUC."""
    return {
        "resolution_0.5_A": crossing(freq, fsc, 0.5, apix),
        "resolution_0.143_A": crossing(freq, fsc, 0.143, apix),
        "auc": fsc_auc(freq, fsc),
    }


def plot_fsc(curves: dict[str, tuple[np.ndarray, np.ndarray]], apix: float, path, title: str = "") -> None:
    """Plot FSC curves (label → (freq cycles/px, fsc)) against 1/Å with dotted 0.5 and 0.143 lines.

    Written atomically (PNG), with the Agg backend so it works on clusters without a display.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from drgn_core.io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, (freq, fsc) in curves.items():
        ax.plot(np.asarray(freq) / apix, fsc, label=label)
    for level in (0.5, 0.143):
        ax.axhline(level, color="grey", linestyle=":", linewidth=1)
        ax.text(0.0, level, f" {level}", va="bottom", ha="left", color="grey", fontsize=8,
                transform=ax.get_yaxis_transform())
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlim(left=0)
    if title:
        ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _read_map(path, what: str) -> tuple[np.ndarray, float]:
    from drgn_core.errors import InputError
    from drgn_core.io.mrc import read_mrc

    data, apix = read_mrc(path, mmap=False)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(f"{what} must be a cubic 3D map, but its data has shape {tuple(data.shape)}", path)
    if not np.isfinite(data).all():
        raise InputError(f"{what} contains NaN or infinite values", path)
    return np.asarray(data, dtype=np.float32), apix


def masked_fsc(v1: np.ndarray, v2: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """FSC of the two maps after multiplying both by `mask` (None: unmasked)."""
    if mask is None:
        return fsc_curve(v1, v2)
    return fsc_curve(v1 * mask, v2 * mask)


def compare_map_files(path_a, path_b, mask: str = "paper", apix: float | None = None,
                      plot=None) -> dict:
    """Everything `drgn fsc` reports for two map files, as a JSON-ready dict (and the plot if asked).

    `mask` is "paper", "none" or the path of a mask map of the same box. The paper mask is built from the
    average of the two maps: symmetric in A and B, and for two half maps it is the usual mask of the full
    map (built from one noisy map alone, noise peaks above the threshold would spread it over the box).
    Boxes must match; pixel sizes must match to 0.1 % unless `apix` overrides the headers.
    """
    from drgn_core.errors import InputError

    a, apix_a = _read_map(path_a, "map A")
    b, apix_b = _read_map(path_b, "map B")
    if a.shape != b.shape:
        raise InputError(f"box {b.shape[0]}³ differs from {path_a}'s {a.shape[0]}³ box "
                         f"(FSC compares maps on the same grid; resample one of them first)", path_b)
    if apix is None:
        if apix_a <= 0 or apix_b <= 0:
            bad = path_a if apix_a <= 0 else path_b
            raise InputError("header has no pixel size; pass --apix", bad)
        if abs(apix_a - apix_b) > 1e-3 * max(apix_a, apix_b):
            raise InputError(f"pixel size {apix_b:g} Å differs from {path_a}'s {apix_a:g} Å (FSC compares "
                             "maps on the same grid; pass --apix only if a header is wrong)", path_b)
        apix = apix_a
    elif apix <= 0:
        raise InputError(f"--apix must be positive, got {apix}")

    if mask == "none":
        m, mask_label = None, "none"
    elif mask == "paper":
        m, mask_label = paper_mask(0.5 * (a + b), apix), "paper"
    else:
        m, _ = _read_map(mask, "mask")
        if m.shape != a.shape:
            raise InputError(f"mask box {m.shape[0]}³ differs from the maps' {a.shape[0]}³", mask)
        if m.min() < -1e-6 or m.max() > 1 + 1e-6:
            raise InputError(f"mask values must lie in [0, 1], found {m.min():g} … {m.max():g}", mask)
        mask_label = str(mask)

    freq, fsc = masked_fsc(a, b, m)
    D = a.shape[0]
    result = {
        "map_a": str(path_a), "map_b": str(path_b), "D": D, "apix": apix, "mask": mask_label,
        **fsc_report(freq, fsc, apix),
        "freq_cycles_per_px": freq.tolist(), "freq_per_A": (freq / apix).tolist(), "fsc": fsc.tolist(),
    }
    curves = {"masked" if m is not None else "unmasked": (freq, fsc)}
    if m is not None:
        freq_u, fsc_u = fsc_curve(a, b)
        result["unmasked"] = {**fsc_report(freq_u, fsc_u, apix), "fsc": fsc_u.tolist()}
        result["mask_fraction"] = float(m.mean())
        curves["unmasked"] = (freq_u, fsc_u)
    if plot:
        plot_fsc(curves, apix, plot, title=f"{_name(path_a)} vs {_name(path_b)}")
    return result


def _name(path) -> str:
    from pathlib import Path

    return Path(path).name
