"""Centred Fourier transforms, frequency lattices and Fourier cropping, pinned by numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drgn_core.fourier import (
    circular_mask,
    downsample_images,
    downsample_volume,
    fft2_center,
    fft3_center,
    fourier_crop,
    freqs_1d,
    ifft2_center,
    ifft3_center,
    lattice_2d,
    lattice_3d,
    radius_2d,
)


def test_frequencies_and_lattice_layout():
    np.testing.assert_allclose(freqs_1d(4), [-0.5, -0.25, 0.0, 0.25])
    lat = lattice_2d(4)
    assert lat.shape == (4, 4, 2)
    np.testing.assert_allclose(lat[2, 3], [0.25, 0.0])  # [y, x] indexing: column 3 is kx = +1/4
    np.testing.assert_allclose(lat[0, 2], [0.0, -0.5])
    np.testing.assert_allclose(lattice_3d(4)[1, 2, 3], [0.25, 0.0, -0.25])  # [z, y, x] → (kx, ky, kz)
    assert radius_2d(8)[4, 4] == 0 and radius_2d(8)[4, 7] == 3
    assert circular_mask(8).sum() == np.sum(radius_2d(8) < 4)


def test_dc_sits_at_the_centre_and_the_origin_is_the_centre_pixel():
    D = 8
    F = fft2_center(np.full((D, D), 2.0))
    assert F[D // 2, D // 2] == pytest.approx(2.0 * D * D)
    assert np.abs(F).sum() == pytest.approx(2.0 * D * D)  # nothing off the DC term
    delta = np.zeros((D, D))
    delta[D // 2, D // 2] = 1.0
    np.testing.assert_allclose(fft2_center(delta), np.ones((D, D)), atol=1e-12)  # centred delta: no phase
    # a delta one pixel to the right of centre has the phase ramp exp(-2πi kx)
    delta = np.zeros((D, D))
    delta[D // 2, D // 2 + 1] = 1.0
    kx = lattice_2d(D)[..., 0]
    np.testing.assert_allclose(fft2_center(delta), np.exp(-2j * np.pi * kx), atol=1e-12)


@pytest.mark.parametrize("D", [8, 10, 16])
def test_fourier_round_trips_numpy_and_torch(D):
    rng = np.random.default_rng(D)
    img = rng.normal(size=(3, D, D))
    np.testing.assert_allclose(ifft2_center(fft2_center(img)).real, img, atol=1e-12)
    vol = rng.normal(size=(D, D, D))
    np.testing.assert_allclose(ifft3_center(fft3_center(vol)).real, vol, atol=1e-12)
    t = torch.from_numpy(img)
    np.testing.assert_allclose(fft2_center(t).numpy(), fft2_center(img), atol=1e-10)
    np.testing.assert_allclose(ifft2_center(fft2_center(t)).real.numpy(), img, atol=1e-12)


def test_fourier_crop_of_a_sinusoid_keeps_its_physical_frequency_and_amplitude():
    D, D_new, cycles = 32, 16, 3  # 3 cycles per box: below the new Nyquist (8 cycles per box)
    x = np.arange(D) - D // 2
    img = 1.5 + 0.7 * np.cos(2 * np.pi * cycles * x / D)[None, :].repeat(D, axis=0)
    F = fourier_crop(fft2_center(img), D_new)
    assert F.shape == (D_new, D_new)
    c = D_new // 2
    # energy only at DC and at kx = ±3 cycles per box, now at columns c ± 3 of the smaller lattice
    nz = np.argwhere(np.abs(F) > 1e-6)
    assert sorted(map(tuple, nz)) == [(c, c - cycles), (c, c), (c, c + cycles)]
    small = downsample_images(img, D_new)
    xs = np.arange(D_new) - D_new // 2
    expected = 1.5 + 0.7 * np.cos(2 * np.pi * cycles * xs / D_new)
    np.testing.assert_allclose(small, expected[None, :].repeat(D_new, axis=0), atol=1e-12)


def test_fourier_crop_rejects_odd_or_growing_sizes():
    F = np.zeros((8, 8), dtype=complex)
    with pytest.raises(ValueError, match="even sizes"):
        fourier_crop(F, 5)
    with pytest.raises(ValueError, match="even sizes"):
        fourier_crop(F, 10)


def test_downsample_volume_keeps_density_values():
    D = 16
    g = np.arange(D) - D // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    vol = np.exp(-(x**2 + y**2 + z**2) / (2 * 3.0**2))
    small = downsample_volume(vol, 8)
    assert small.shape == (8, 8, 8)
    # a smooth blob sampled at half the rate: same peak value, and total mass scaled by (8/16)^3
    assert small[4, 4, 4] == pytest.approx(vol[8, 8, 8], rel=1e-3)
    assert small.sum() == pytest.approx(vol.sum() / 8, rel=1e-6)
