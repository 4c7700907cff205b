"""Centred Fourier transforms, frequency lattices and masks.

Convention (docs/architecture.md § Fourier transforms): transforms are centred,
``fftshift(fftn(ifftshift(x)))``, so the DC term of a D-point axis sits at index D//2 and real-space index
D//2 is the origin. Frequencies are in cycles/pixel, k = (i - D//2) / D ∈ [-1/2, 1/2); spatial frequency in
Å⁻¹ is k / apix. Arrays are indexed [y, x] (images) and [z, y, x] (volumes), as mrcfile returns them.

Every function accepts numpy arrays or torch tensors and returns the same kind, so the simulator,
reconstruction and training share one definition of "the transform".
"""

from __future__ import annotations

import numpy as np
import torch

Array = np.ndarray | torch.Tensor


def _axes(ndim: int, nd: int) -> tuple[int, ...]:
    return tuple(range(ndim - nd, ndim))


def fftn_center(x: Array, nd: int) -> Array:
    """Centred forward FFT over the last `nd` axes."""
    ax = _axes(x.ndim, nd)
    if isinstance(x, torch.Tensor):
        return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=ax), dim=ax), dim=ax)
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=ax), axes=ax), axes=ax)


def ifftn_center(X: Array, nd: int) -> Array:
    """Centred inverse FFT over the last `nd` axes (complex result)."""
    ax = _axes(X.ndim, nd)
    if isinstance(X, torch.Tensor):
        return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(X, dim=ax), dim=ax), dim=ax)
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(X, axes=ax), axes=ax), axes=ax)


def fft2_center(x: Array) -> Array:
    """Centred 2D transform of images (..., D, D)."""
    return fftn_center(x, 2)


def ifft2_center(X: Array) -> Array:
    """Centred inverse 2D transform (complex)."""
    return ifftn_center(X, 2)


def fft3_center(x: Array) -> Array:
    """Centred 3D transform of volumes (..., D, D, D)."""
    return fftn_center(x, 3)


def ifft3_center(X: Array) -> Array:
    """Centred inverse 3D transform (complex)."""
    return ifftn_center(X, 3)


def freqs_1d(D: int) -> np.ndarray:
    """Frequencies (cycles/pixel) of a centred D-point axis: (i - D//2) / D."""
    return (np.arange(D) - D // 2) / D


def lattice_2d(D: int) -> np.ndarray:
    """(D, D, 2) array of (kx, ky) in cycles/pixel; [y, x] indexing, so lattice[i, j] = (k[j], k[i])."""
    k = freqs_1d(D)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    return np.stack([kx, ky], axis=-1)


def lattice_3d(D: int) -> np.ndarray:
    """(D, D, D, 3) array of (kx, ky, kz) in cycles/pixel for a volume indexed [z, y, x]."""
    k = freqs_1d(D)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    return np.stack([kx, ky, kz], axis=-1)


def radius_2d(D: int) -> np.ndarray:
    """(D, D) distance from the DC term, in pixels of the transform (|k|·D)."""
    return np.linalg.norm(lattice_2d(D), axis=-1) * D


def radius_3d(D: int) -> np.ndarray:
    """(D, D, D) distance from the DC term, in voxels of the transform."""
    return np.linalg.norm(lattice_3d(D), axis=-1) * D


def circular_mask(D: int, radius: float | None = None) -> np.ndarray:
    """Boolean (D, D) mask of transform pixels with |k|·D < radius (default D/2: inside Nyquist)."""
    r = D / 2 if radius is None else radius
    return radius_2d(D) < r


def fourier_crop(F: Array, D_new: int) -> Array:
    """Keep the central D_new×D_new block of centred 2D transforms (..., D, D).

    Both sizes are even, so the DC term stays at index D//2 → D_new//2.
    """
    D = F.shape[-1]
    if D_new > D or D_new % 2 or D % 2:
        raise ValueError(f"fourier_crop needs even sizes with D_new <= D, got D={D}, D_new={D_new}")
    a = D // 2 - D_new // 2
    return F[..., a : a + D_new, a : a + D_new]


def downsample_images(images: Array, D_new: int) -> Array:
    """Fourier-crop real images (..., D, D) to (..., D_new, D_new).

    Intensities are rescaled by (D_new/D)² so that pixel values keep their meaning (the mean density of
    a particle does not change with sampling), as RELION and cryoDRGN do.
    """
    D = images.shape[-1]
    if D_new == D:
        return images
    F = fourier_crop(fft2_center(images), D_new)
    out = ifft2_center(F).real * (D_new / D) ** 2
    return out


def downsample_volume(vol: Array, D_new: int) -> Array:
    """Fourier-crop a real volume (D, D, D) to (D_new, D_new, D_new), keeping density values."""
    D = vol.shape[-1]
    if D_new == D:
        return vol
    F = fft3_center(vol)
    a = D // 2 - D_new // 2
    sl = slice(a, a + D_new)
    return ifft3_center(F[..., sl, sl, sl]).real * (D_new / D) ** 3
