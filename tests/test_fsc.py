"""FSC curve, resolution read-outs, the paper's mask and `drgn fsc`, against analytic values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from drgn_core.cli import main
from drgn_core.fourier import radius_3d
from drgn_core.fsc import compare_map_files, crossing, fsc_auc, fsc_curve, paper_mask
from drgn_core.io.mrc import write_mrc


def plane_wave(D: int, m: int, phase: float = 0.0) -> np.ndarray:
    """cos(2π m x / D + phase) on a D³ grid: all its power sits at |k|·D = m."""
    x = np.arange(D) - D // 2
    wave = np.cos(2 * np.pi * m * x / D + phase)
    return np.broadcast_to(wave[None, None, :], (D, D, D)).copy()


def test_identical_maps_correlate_perfectly_and_frequencies_are_r_over_D():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(24, 24, 24))
    freq, fsc = fsc_curve(v, v)
    assert freq.shape == fsc.shape == (12,)
    np.testing.assert_allclose(freq, np.arange(12) / 24)
    np.testing.assert_allclose(fsc, 1.0, atol=1e-12)
    _, neg = fsc_curve(v, -v)
    assert neg[0] == 1.0  # FSC(0) = 1 by convention
    np.testing.assert_allclose(neg[1:], -1.0, atol=1e-12)


@pytest.mark.parametrize("m", [1, 3, 7])
def test_phase_shifted_plane_waves_give_cos_phase_in_their_shell_only(m):
    D, phi = 20, 1.1
    _, fsc = fsc_curve(plane_wave(D, m), plane_wave(D, m, phi))
    # a wave of integer frequency m sits at |k|·D = m, i.e. in shell r = m + 1 (r-1 <= |k|D < r)
    assert fsc[m + 1] == pytest.approx(math.cos(phi), abs=1e-9)
    others = np.delete(np.arange(1, D // 2), m)
    np.testing.assert_allclose(fsc[others], 0.0, atol=1e-9)


def test_shells_match_a_direct_loop_over_voxels():
    rng = np.random.default_rng(1)
    D = 16
    a, b = rng.normal(size=(D, D, D)), rng.normal(size=(D, D, D))
    b = a + 0.7 * b
    _, fsc = fsc_curve(a, b)
    Fa = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(a)))
    Fb = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(b)))
    r = radius_3d(D)
    for shell in range(1, D // 2):
        sel = (r >= shell - 1) & (r < shell)
        x, y = Fa[sel], Fb[sel]
        expect = np.real(np.vdot(x, y)) / np.sqrt(np.vdot(x, x).real * np.vdot(y, y).real)
        assert fsc[shell] == pytest.approx(expect, abs=1e-12)


def test_torch_and_numpy_inputs_agree():
    import torch

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(12, 12, 12)), rng.normal(size=(12, 12, 12))
    np.testing.assert_allclose(fsc_curve(a, b)[1], fsc_curve(torch.tensor(a), torch.tensor(b))[1])


def test_crossing_interpolates_the_first_crossing_in_frequency():
    freq = np.arange(16) / 32
    fsc = 1 - 2 * freq                      # crosses 0.5 at f = 0.25, 0.143 at f = 0.4285
    assert crossing(freq, fsc, 0.5, apix=2.0) == pytest.approx(2.0 / 0.25)
    assert crossing(freq, fsc, 0.143, apix=1.0) == pytest.approx(1 / ((1 - 0.143) / 2))
    # first crossing wins even when the curve comes back up
    bumpy = np.array([1, 0.9, 0.4, 0.8, 0.1, 0.0])
    f6 = np.arange(6) / 12
    assert crossing(f6, bumpy, 0.5) == pytest.approx(1 / (f6[1] + (0.9 - 0.5) / 0.5 * (f6[2] - f6[1])))
    # never below: the resolution of the last shell
    assert crossing(freq, np.ones(16), 0.143, apix=3.0) == pytest.approx(3.0 / freq[-1])


def test_auc_of_a_perfect_curve_is_the_frequency_range():
    D = 32
    freq, fsc = np.arange(D // 2) / D, np.ones(D // 2)
    assert fsc_auc(freq, fsc) == pytest.approx((D / 2 - 1) / D)
    assert fsc_auc(freq, -fsc) == pytest.approx((D / 2 - 1) / D)  # |FSC|


def test_paper_mask_dilates_25A_then_falls_as_a_15A_cosine():
    D, apix = 64, 2.0
    c = D // 2
    z, y, x = np.indices((D, D, D)) - c
    vol = (x**2 + y**2 + z**2 <= 9).astype(np.float32)  # a ball of radius 3 voxels
    mask = paper_mask(vol, apix)
    row = mask[c, c, :]
    edge = c + 3  # last core voxel along +x; voxel edge + n lies n·apix Å from the core
    assert row[edge] == 1.0
    assert row[edge + 12] == 1.0                                      # 24 Å
    assert row[edge + 13] == pytest.approx(0.5 * (1 + math.cos(math.pi * 1 / 15)))   # 26 Å
    assert row[edge + 16] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))   # 32 Å
    assert row[edge + 20] == 0.0                                      # 40 Å
    assert mask.min() == 0.0 and mask.max() == 1.0


def _write_pair(tmp_path, D=32, apix=2.0, apix_b=None, noise=0.5, noise_a=None):
    rng = np.random.default_rng(3)
    z, y, x = np.indices((D, D, D)) - D // 2
    blob = np.exp(-(x**2 + (y - 2) ** 2 + z**2) / 8.0) + 0.5 * np.exp(-((x - 4) ** 2 + y**2 + z**2) / 4.0)
    a = blob + (noise if noise_a is None else noise_a) * rng.normal(size=blob.shape)
    b = blob + noise * rng.normal(size=blob.shape)
    write_mrc(tmp_path / "a.mrc", a, apix)
    write_mrc(tmp_path / "b.mrc", b, apix if apix_b is None else apix_b)
    return a, b


def test_drgn_fsc_writes_json_and_plot(tmp_path):
    a, b = _write_pair(tmp_path)
    out = tmp_path / "fsc.json"
    rc = main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "-o", str(out), "--mask", "none",
               "--plot", str(tmp_path / "fsc.png")])
    assert rc == 0
    res = json.loads(out.read_text())
    freq, fsc = fsc_curve(a, b)
    np.testing.assert_allclose(res["fsc"], fsc, atol=1e-6)
    assert res["resolution_0.5_A"] == pytest.approx(crossing(freq, fsc, 0.5, 2.0), rel=1e-6)
    assert res["resolution_0.143_A"] == pytest.approx(crossing(freq, fsc, 0.143, 2.0), rel=1e-6)
    assert res["mask"] == "none" and "unmasked" not in res
    assert (tmp_path / "fsc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paper_mask_is_symmetric_and_raises_the_fsc_of_noisy_maps(tmp_path):
    # a clean map against a noisy one, as for a generated volume against a back-projection; at 5 Å/px
    # the loose mask (25 + 15 Å) stays well inside the 32-voxel box
    _write_pair(tmp_path, apix=5.0, noise=0.3, noise_a=0.0)
    ab = compare_map_files(tmp_path / "a.mrc", tmp_path / "b.mrc", mask="paper")
    ba = compare_map_files(tmp_path / "b.mrc", tmp_path / "a.mrc", mask="paper")
    np.testing.assert_allclose(ab["fsc"], ba["fsc"], atol=1e-12)
    # the mask removes noise far from the particle, so the masked curve is higher at mid frequencies
    assert np.mean(ab["fsc"][2:8]) > np.mean(ab["unmasked"]["fsc"][2:8])
    assert 0 < ab["mask_fraction"] < 1


def test_mask_file_is_applied(tmp_path):
    a, b = _write_pair(tmp_path)
    m = np.zeros_like(a)
    m[8:24, 8:24, 8:24] = 1.0
    write_mrc(tmp_path / "m.mrc", m, 2.0)
    res = compare_map_files(tmp_path / "a.mrc", tmp_path / "b.mrc", mask=str(tmp_path / "m.mrc"))
    np.testing.assert_allclose(res["fsc"], fsc_curve(a * m, b * m)[1], atol=1e-5)


def test_mismatched_boxes_and_pixel_sizes_are_clear_errors(tmp_path, capsys):
    _write_pair(tmp_path, apix_b=2.5)
    a, b, small = tmp_path / "a.mrc", tmp_path / "b.mrc", tmp_path / "small.mrc"
    rc = main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "-o", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == (f"drgn fsc: error: {b}: pixel size 2.5 Å differs from {a}'s "
                   "2 Å (FSC compares maps on the same grid; pass --apix only if a header is wrong)")
    assert not (tmp_path / "x.json").exists()
    # --apix overrides wrong headers
    assert main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "-o", str(tmp_path / "x.json"),
                 "--apix", "2.0"]) == 0

    write_mrc(tmp_path / "small.mrc", np.zeros((16, 16, 16), np.float32), 2.0)
    rc = main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "small.mrc"), "-o", str(tmp_path / "y.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == (f"drgn fsc: error: {small}: box 16³ differs from {a}'s 32³ "
                   "box (FSC compares maps on the same grid; resample one of them first)")


def test_output_may_not_overwrite_an_input(tmp_path, capsys):
    _write_pair(tmp_path)
    before = (tmp_path / "b.mrc").read_bytes()
    rc = main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "-o", str(tmp_path / "b.mrc")])
    assert rc == 2
    assert "refusing to overwrite it" in capsys.readouterr().err
    assert (tmp_path / "b.mrc").read_bytes() == before
