"""Fourier-slice projection: projection-slice theorem, pose and shift conventions, fast vs reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drgn_core.ctf import ctf_from_params
from drgn_core.fourier import fft2_center, fft3_center, ifft2_center, lattice_2d
from drgn_core.pose import euler_to_matrix, random_poses
from drgn_core.projection import (
    apply_shift_ft,
    prepare_volume_ft,
    project_real,
    project_volume_ft,
    render_full,
    render_images,
)


def blobs(D: int, centres: list[tuple[float, float, float]], sigmas: list[float]) -> np.ndarray:
    """A smooth (band-limited in practice) volume of Gaussian blobs at (x, y, z) px from the centre voxel."""
    g = np.arange(D) - D // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    vol = np.zeros((D, D, D))
    for (cx, cy, cz), s in zip(centres, sigmas):
        vol += np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))
    return vol


def chiral(D: int) -> np.ndarray:
    return blobs(D, [(D / 8, -D / 10, D / 16), (-D / 6, D / 7, 0.0), (0.0, D / 5, -D / 6)],
                 [D / 14, D / 16, D / 12])


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def centroid(img: np.ndarray, radius: int = 6) -> np.ndarray:
    """(x, y) intensity centroid, relative to the centre pixel D//2, within `radius` px of the brightest
    pixel: the window keeps the faint, far interpolation artefacts of a Fourier slice out of the mean."""
    D = img.shape[-1]
    g = np.arange(D) - D // 2
    y, x = np.meshgrid(g, g, indexing="ij")
    iy, ix = np.unravel_index(np.argmax(img), img.shape)
    w = img * ((x - g[ix]) ** 2 + (y - g[iy]) ** 2 <= radius**2)
    return np.array([(w * x).sum() / w.sum(), (w * y).sum() / w.sum()])


@pytest.mark.parametrize("D", [24, 32])
def test_projection_slice_theorem_random_poses(D):
    vol = chiral(D)
    A = random_poses(5, np.random.default_rng(D))
    slices = project_volume_ft(prepare_volume_ft(vol), A)
    assert slices.shape == (5, D, D)
    fourier = ifft2_center(slices).real
    real = project_real(vol, A)
    for i in range(5):
        assert corr(fourier[i], real[i]) >= 0.999
    # same scale too: the slice is the unscaled DFT of Σ_z V
    np.testing.assert_allclose(fourier.sum(axis=(1, 2)), real.sum(axis=(1, 2)), rtol=2e-3)


def test_torch_slicer_matches_numpy_and_full_transform_matches_fft3():
    D = 16
    vol = chiral(D)
    vft = prepare_volume_ft(vol)
    P = 2 * D
    padded = np.zeros((P, P, P))
    o = P // 2 - D // 2
    padded[o : o + D, o : o + D, o : o + D] = vol
    np.testing.assert_allclose(vft.full(), fft3_center(padded), atol=1e-9)
    vt = prepare_volume_ft(torch.from_numpy(vol))
    np.testing.assert_allclose(vt.full().numpy(), fft3_center(padded), atol=1e-9)
    A = random_poses(7, np.random.default_rng(1))
    a = project_volume_ft(vft, A)
    b = project_volume_ft(vt, torch.from_numpy(A)).numpy()
    np.testing.assert_allclose(b, a, atol=1e-9 * np.abs(a).max())
    # a raw (unpadded) centred transform is accepted as such
    raw = project_volume_ft(fft3_center(vol), A[:2])
    assert corr(ifft2_center(raw).real[0], project_real(vol, A[0])) > 0.98


def test_point_lands_where_the_pose_sends_it():
    """A blob at r (px from the centre) appears in the image at (A r)_xy: pins A, not Aᵀ."""
    D = 32
    r = np.array([6.0, -3.0, 4.0])
    vol = blobs(D, [tuple(r)], [1.5])
    A = euler_to_matrix(np.array([[30.0, 50.0, -70.0], [120.0, 100.0, 10.0]]))
    imgs = ifft2_center(project_volume_ft(prepare_volume_ft(vol), A)).real
    for i in range(2):
        np.testing.assert_allclose(centroid(imgs[i]), (A[i] @ r)[:2], atol=0.05)
        assert np.abs(centroid(imgs[i]) - (A[i].T @ r)[:2]).max() > 1.0


def test_stored_origin_recentres_a_displaced_particle():
    D, apix = 32, 2.0
    vol = blobs(D, [(0.0, 0.0, 0.0)], [2.0])
    rng = np.random.default_rng(5)
    disp = rng.uniform(-4, 4, (6, 2))  # where the particle sits, px
    origin = -disp  # what a RELION table stores (rlnOriginX/YAngst / apix)
    A = random_poses(6, rng)
    imgs = render_images(vol, A, origin, None)
    for i in range(6):
        np.testing.assert_allclose(centroid(imgs[i]), disp[i], atol=0.05)
    recentred = ifft2_center(apply_shift_ft(fft2_center(imgs), origin)).real
    for i in range(6):
        np.testing.assert_allclose(centroid(recentred[i]), [0.0, 0.0], atol=0.05)
    # a single (D, D) transform with one shift works too
    one = ifft2_center(apply_shift_ft(fft2_center(imgs[0]), origin[0])).real
    np.testing.assert_allclose(one, recentred[0], atol=1e-12)
    assert apix > 0  # shifts are in px of the image they apply to; Å → px happens in the table accessors


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_render_images_equals_the_textbook_expression(backend):
    D = 24
    vol = chiral(D)
    rng = np.random.default_rng(2)
    n = 5
    A = random_poses(n, rng)
    origin = rng.uniform(-3, 3, (n, 2))
    params = np.column_stack([np.full(n, 2.0), rng.uniform(1e4, 2e4, n), rng.uniform(1e4, 2e4, n),
                              rng.uniform(0, 180, n), np.full(n, 300.0), np.full(n, 2.7), np.full(n, 0.1),
                              np.zeros(n), np.full(n, 60.0)])
    vft = prepare_volume_ft(vol)
    ctf = ctf_from_params(lattice_2d(D).reshape(-1, 2), params).reshape(n, D, D)
    ref = render_full(vft, A, origin, ctf)
    if backend == "torch":
        got = render_images(prepare_volume_ft(torch.from_numpy(vol)), torch.from_numpy(A),
                            torch.from_numpy(origin), torch.from_numpy(params), chunk=2).numpy()
    else:
        got = render_images(vft, A, origin, params, chunk=2)
    assert got.shape == (n, D, D)
    # equal but for how the unpaired Nyquist row and column are symmetrised: tiny for a smooth object
    np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max())
    # the apix argument overrides the CTF's pixel size: at 4 Å/px the same images differ
    other = render_images(vft, A, origin, params, apix=4.0)
    assert np.abs(other - got).max() > 0.1 * np.abs(got).max()


def test_cropped_slices_are_fourier_cropped_projections():
    D, D_out = 32, 16
    vol = chiral(D)
    A = random_poses(3, np.random.default_rng(4))
    vft = prepare_volume_ft(vol)
    full = project_volume_ft(vft, A)
    crop = project_volume_ft(vft, A, D_out=D_out)
    a = D // 2 - D_out // 2
    np.testing.assert_allclose(crop, full[:, a : a + D_out, a : a + D_out], atol=1e-9)
    assert project_volume_ft(vft, A[0]).shape == (D, D)
    with pytest.raises(ValueError, match="D_out must be even"):
        project_volume_ft(vft, A, D_out=40)


def test_float32_volume_gives_complex64_and_bad_shapes_are_refused():
    vol = chiral(16).astype(np.float32)
    vft = prepare_volume_ft(vol)
    assert vft.data.dtype == np.complex64 and vft.half and vft.P == 32
    with pytest.raises(ValueError, match="cubic"):
        prepare_volume_ft(np.zeros((8, 8, 6)))
    with pytest.raises(ValueError, match="even"):
        prepare_volume_ft(np.zeros((9, 9, 9)))
    with pytest.raises(ValueError, match="poses"):
        project_volume_ft(vft, np.zeros((4, 3)))
