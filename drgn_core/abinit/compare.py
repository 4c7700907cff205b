"""Compare poses found ab initio with known ones (simulated data): after the best global rotation and hand.

A map found ab initio is the true one up to a global rotation, a global translation and its hand:

- rotation: if the found map is the true one rotated, every found pose is Aᶠ = Aᵗ·G for one fixed G; G is
  estimated as the chordal mean of Aᵗᵀ·Aᶠ (SVD projection onto SO(3)), then refined by the same mean over
  the particles within 2× the median error (robust to the few images assigned far off);
- hand: the mirror image V'(x, y, z) = V(x, y, -z) projects at pose A exactly as V does at M·A·M, with
  M = diag(1, 1, -1), so data explained by one hand are explained equally well by the other. Both are
  tried and the better kept;
- translation: a 3D offset d of the map changes every particle's origin by the first two rows of Aᶠ·d,
  fitted by least squares; shift errors are reported after removing it.

Maps. With Aᶠ = Aᵗ·G the found map is Vᶠ(x) = Vᵗ(G·x) (a slice of F at Aᵀk for every image: Fᶠ(Gᵀq) =
Fᵗ(q)), so `map_in_true_frame` resamples Vᶠ at Gᵀ·y (after mirroring it when the hand was flipped) and
then removes the map's offset by cross-correlation with the truth. `map_resolution` is the FSC crossing
of a map against the truth: what the refined decoder's map is judged by, next to the same crossing of a
map trained with the true poses (already in the true frame).
"""

from __future__ import annotations

import numpy as np

from drgn_core.abinit.grid import rotation_angle

MIRROR = np.diag([1.0, 1.0, -1.0])


def _project_so3(M: np.ndarray) -> np.ndarray:
    U, _, Vt = np.linalg.svd(M)
    d = np.sign(np.linalg.det(U @ Vt))
    return U @ np.diag([1.0, 1.0, d]) @ Vt


def fit_global_rotation(A_true: np.ndarray, A_found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G, per-particle errors in degrees) for A_found ≈ A_true·G, robust to a minority of images far off
    (refitted on those within twice the median error)."""
    G = _project_so3(np.einsum("nji,njk->ik", A_true, A_found))
    err = rotation_angle(A_true @ G, A_found)
    for _ in range(3):
        close = err <= 2 * np.median(err) + 1e-9
        G = _project_so3(np.einsum("nji,njk->ik", A_true[close], A_found[close]))
        err = rotation_angle(A_true @ G, A_found)
    return G, err


def pose_errors(A_true: np.ndarray, t_true: np.ndarray, A_found: np.ndarray, t_found: np.ndarray) -> dict:
    """Rotation errors (degrees) and shift errors (px) after the best global alignment and hand.

    A_* (N, 3, 3) poses; t_* (N, 2) RELION origins in px of one box. Returns medians, means, the hand
    ('same' or 'flipped'), the global rotation angle and the fitted 3D map offset (px), plus the
    per-particle arrays under `rotation_error` / `shift_error`.
    """
    A_true = np.asarray(A_true, dtype=np.float64)
    A_found = np.asarray(A_found, dtype=np.float64)
    best = None
    for hand, Af in (("same", A_found), ("flipped", MIRROR @ A_found @ MIRROR)):
        G, err = fit_global_rotation(A_true, Af)
        if best is None or np.median(err) < np.median(best[2]):
            best = (hand, G, err, Af)
    hand, G, err, Af = best
    # the mirrored map projects at M·A·M onto the same image coordinates: shifts are unchanged
    dt = np.asarray(t_found, dtype=np.float64) - np.asarray(t_true, dtype=np.float64)   # (N, 2)
    P = Af[:, :2, :]                                                          # (N, 2, 3)
    d, *_ = np.linalg.lstsq(P.reshape(-1, 3), dt.reshape(-1), rcond=None)
    serr = np.linalg.norm(dt - P @ d, axis=1)
    return {"median_rotation_error_deg": float(np.median(err)), "mean_rotation_error_deg": float(err.mean()),
            "median_shift_error_px": float(np.median(serr)), "mean_shift_error_px": float(serr.mean()),
            "hand": hand, "global_rotation_deg": float(rotation_angle(G, np.eye(3))),
            "global_rotation": G.tolist(),
            "map_offset_px": [float(x) for x in d], "rotation_error": err, "shift_error": serr}


def map_in_true_frame(vol: np.ndarray, truth: np.ndarray, G: np.ndarray, hand: str) -> np.ndarray:
    """The found map `vol` (D³, [z, y, x]) brought into the frame of `truth`: mirrored if `hand` is
    'flipped', rotated by the global rotation G of `pose_errors`, and shifted by the offset that maximises
    its cross-correlation with the truth (integer peak refined to a sub-voxel one by a parabola per axis).
    Cubic-spline resampling, so the rotation costs the map as little high-frequency signal as possible."""
    from scipy.ndimage import affine_transform

    from drgn_core.fourier import fft3_center, ifft3_center
    from drgn_core.volumes import flip_hand

    v = flip_hand(vol) if hand == "flipped" else np.asarray(vol)
    D = v.shape[0]
    rev = np.eye(3)[::-1]                                         # (x, y, z) ↔ array axes (z, y, x)
    M = rev @ np.asarray(G, dtype=np.float64).T @ rev             # W[i] = V[M·(i - c) + c]
    c = np.full(3, D // 2, dtype=np.float64)
    w = affine_transform(v.astype(np.float64), M, offset=c - M @ c, order=3, mode="constant")
    Fw, Ft = fft3_center(w), fft3_center(np.asarray(truth, dtype=np.float64))
    cc = np.real(ifft3_center(Ft * np.conj(Fw)))                 # peak at the shift taking w onto truth
    peak = np.array(np.unravel_index(np.argmax(cc), cc.shape))
    d = peak - D // 2
    sub = np.zeros(3)
    for ax in range(3):
        lo, hi = peak.copy(), peak.copy()
        lo[ax], hi[ax] = (peak[ax] - 1) % D, (peak[ax] + 1) % D
        a, b, e = cc[tuple(lo)], cc[tuple(peak)], cc[tuple(hi)]
        den = a - 2 * b + e
        sub[ax] = 0.5 * (a - e) / den if den < 0 else 0.0
    d = d + sub                                                   # (z, y, x) voxels
    k = (np.arange(D) - D // 2) / D
    KZ, KY, KX = np.meshgrid(k, k, k, indexing="ij")
    ramp = np.exp(-2j * np.pi * (KZ * d[0] + KY * d[1] + KX * d[2]))
    return np.real(ifft3_center(Fw * ramp)).astype(np.float32)


def map_resolution(vol: np.ndarray, truth: np.ndarray, apix: float, threshold: float = 0.5) -> float:
    """Resolution (Å) where the FSC of `vol` against `truth` first drops below `threshold`."""
    from drgn_core.fsc import crossing, fsc_curve

    freq, fsc = fsc_curve(vol, truth)
    return crossing(freq, fsc, threshold, apix)
