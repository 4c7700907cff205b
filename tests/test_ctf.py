"""The CTF equals RELION's formula at hand-computed points; sign, astigmatism angle, envelope, backends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from drgn_core.ctf import CTF_COLUMNS, compute_ctf, ctf_from_params, electron_wavelength
from drgn_core.fourier import lattice_2d

# λ = 12.2643247 / sqrt(V (1 + 0.978466e-6 V)):
#   300 kV: sqrt(300000 · 1.2935398) = sqrt(388061.94) = 622.94618 → λ = 0.0196876153 Å
#   200 kV: sqrt(200000 · 1.1956932) = sqrt(239138.64) = 489.01804 → λ = 0.0250794936 Å
LAMBDA_300, LAMBDA_200 = 0.0196876153, 0.0250794936


def test_wavelengths():
    assert electron_wavelength(300.0) == pytest.approx(LAMBDA_300, rel=1e-8)
    assert electron_wavelength(200.0) == pytest.approx(LAMBDA_200, rel=1e-8)


def test_point_1_no_astigmatism_300kv():
    # s = (0.1, 0) Å⁻¹, s² = 0.01; U = V = 20000 Å → Δ = -20000; Cs 2.7 mm; w = 0.1; no phase shift, B = 0
    #   π λ Δ s²          = π · 0.0196876153 · (-20000) · 0.01        = -12.3700935
    #   (π/2) Cs λ³ s⁴    = 1.5707963 · 2.7e7 · 7.63096e-6 · 1e-4     =   0.0323641
    #   atan(w/√(1-w²))   = atan(0.1 / 0.9949874)                     =   0.1001674
    #   γ = -12.3700935 + 0.0323641 - 0.1001674 = -12.4378969;  CTF = -sin γ = -0.1281206
    v = compute_ctf(np.array([[0.1, 0.0]]), 20000, 20000, 0, 300, 2.7, 0.1)
    assert v[0] == pytest.approx(-0.1281206, abs=2e-7)


def test_point_2_astigmatic_along_y():
    # s = (0, 0.05): θ = 90°; U = 15000, V = 14000, θ_ast = 0 → cos 2(θ - θ_ast) = cos 180° = -1
    #   Δ = -[(15000 + 14000)/2 + (15000 - 14000)/2 · (-1)] = -14000 (the V defocus, as RELION's sign says)
    #   π λ Δ s² = π · 0.0196876153 · (-14000) · 0.0025 = -2.1647664;  (π/2) Cs λ³ s⁴ = 0.0020228
    #   γ = -2.1647664 + 0.0020228 - 0.1001674 = -2.2629110;  CTF = -sin γ = 0.7698982
    v = compute_ctf(np.array([[0.0, 0.05]]), 15000, 14000, 0, 300, 2.7, 0.1)
    assert v[0] == pytest.approx(0.7698982, abs=2e-7)


def test_point_3_phase_plate_and_envelope_200kv():
    # s = (0.1, 0.1), s² = 0.02; U = V = 10000; 200 kV, Cs 1.4, w 0.07; phase shift 90°; B = 50 Å²
    #   π λ Δ s² = π · 0.0250794936 · (-10000) · 0.02 = -15.7579105
    #   (π/2) Cs λ³ s⁴ = 1.5707963 · 1.4e7 · 1.57745e-5 · 4e-4 = 0.1387600
    #   atan(0.07 / 0.9975470) = 0.0700573;  φ = π/2 = 1.5707963
    #   γ = -15.7579105 + 0.1387600 - 1.5707963 - 0.0700573 = -17.2600042;  -sin γ = -0.9998242
    #   envelope exp(-B s²/4) = exp(-0.25) = 0.7788008 → CTF = -0.7786638
    v = compute_ctf(np.array([[0.1, 0.1]]), 10000, 10000, 0, 200, 1.4, 0.07, 90.0, 50.0)
    assert v[0] == pytest.approx(-0.7786638, abs=2e-7)


def test_zero_frequency_gives_plus_w_and_phase_shift_rotates_it():
    s0 = np.zeros((1, 2))
    assert compute_ctf(s0, 15000, 14000, 33, 300, 2.7, 0.1)[0] == pytest.approx(0.1, abs=1e-15)
    assert compute_ctf(s0, 15000, 14000, 33, 300, 2.7, 0.07, bfactor=80)[0] == pytest.approx(0.07, abs=1e-15)
    # with a 90° phase plate: -sin(-π/2 - α) = cos α = √(1 - w²)
    assert compute_ctf(s0, 1e4, 1e4, 0, 300, 2.7, 0.1, 90.0)[0] == pytest.approx(math.sqrt(0.99), abs=1e-12)


def test_astigmatism_angle_direction():
    # With U > V and θ_ast = 30°, frequencies along 30° see defocus U and along 120° see V.
    U, V, ang = 22000.0, 18000.0, 30.0
    s = np.linspace(0.005, 0.2, 40)
    for direction, df in [(30.0, U), (120.0, V), (210.0, U), (-60.0, V)]:
        t = math.radians(direction)
        freqs = np.stack([s * math.cos(t), s * math.sin(t)], axis=-1)
        np.testing.assert_allclose(compute_ctf(freqs, U, V, ang, 300, 2.7, 0.1),
                                   compute_ctf(freqs, df, df, 0.0, 300, 2.7, 0.1), atol=1e-10)
    # and not the other way round: along 30° the V defocus would be wrong
    t = math.radians(30.0)
    freqs = np.stack([s * math.cos(t), s * math.sin(t)], axis=-1)
    wrong = compute_ctf(freqs, V, V, 0, 300, 2.7, 0.1)
    assert np.abs(compute_ctf(freqs, U, V, ang, 300, 2.7, 0.1) - wrong).max() > 0.5


def test_bfactor_envelope():
    freqs = lattice_2d(32).reshape(-1, 2) / 2.0
    s2 = (freqs**2).sum(-1)
    plain = compute_ctf(freqs, 15000, 14000, 10, 300, 2.7, 0.1)
    damped = compute_ctf(freqs, 15000, 14000, 10, 300, 2.7, 0.1, 0.0, 120.0)
    np.testing.assert_allclose(damped, plain * np.exp(-120.0 * s2 / 4), atol=1e-14)


def test_torch_and_numpy_agree_and_batch_from_params():
    rng = np.random.default_rng(0)
    n = 6
    params = np.column_stack([
        np.full(n, 2.5), rng.uniform(8e3, 3e4, n), rng.uniform(8e3, 3e4, n), rng.uniform(0, 180, n),
        rng.choice([200.0, 300.0], n), rng.uniform(1, 3, n), rng.uniform(0.05, 0.15, n),
        rng.uniform(0, 120, n), rng.uniform(0, 150, n),
    ])
    assert params.shape[1] == len(CTF_COLUMNS)
    lat = lattice_2d(24).reshape(-1, 2)
    ref = ctf_from_params(lat, params)
    assert ref.shape == (n, 24 * 24)
    # each row equals compute_ctf at frequencies k / apix with that particle's parameters
    for i in range(n):
        np.testing.assert_allclose(ref[i], compute_ctf(lat / 2.5, *params[i, 1:]), atol=1e-12)
    t64 = ctf_from_params(torch.from_numpy(lat), torch.from_numpy(params))
    assert t64.dtype == torch.float64
    np.testing.assert_allclose(t64.numpy(), ref, atol=1e-12)
    t32 = ctf_from_params(torch.from_numpy(lat).float(), torch.from_numpy(params).float())
    assert t32.dtype == torch.float32
    np.testing.assert_allclose(t32.numpy(), ref, atol=5e-4)  # γ reaches ~30 rad: float32 rounding
    tc = compute_ctf(torch.from_numpy(lat / 2.5), *(torch.tensor(v) for v in params[0, 1:]))
    np.testing.assert_allclose(tc.numpy(), ref[0], atol=1e-12)
