"""Optics groups with different pixel sizes and/or boxes, and bad images, in `drgn downsample`.

The resampling is checked against analytic values: band-limited cosines and smooth Gaussian blobs are
sampled at each group's pixel size and box, and after downsampling every group must hold the samples of
the same function on the one common grid. The limits of what resampling may hide are checked by their
exact messages, with the figures worked out by hand below.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_io import default_particles, star_text, write_stack

from drgn_core.cli import main
from drgn_core.downsample import fourier_crop_real, fourier_resize_real, plan_resampling, resample_matrix
from drgn_core.errors import InputError
from drgn_core.io import open_stack, read_table

torch.set_num_threads(1)


# ---- the resampling operator against analytic values -------------------------------------------------

def _cosines(P: int, extent: float, terms: list[tuple[float, int, int, float]]) -> np.ndarray:
    """Σ a·cos(2π(kx·x + ky·y)/extent + φ) on a P×P grid over `extent` Å, origin at index P//2."""
    c = (np.arange(P) - P // 2) * extent / P
    y, x = np.meshgrid(c, c, indexing="ij")
    return sum(a * np.cos(2 * np.pi * (kx * x + ky * y) / extent + ph) for a, kx, ky, ph in terms)


@pytest.mark.parametrize("P,D", [(63, 32), (64, 32), (65, 40), (127, 64), (31, 48), (32, 48), (61, 64),
                                 (127, 128)])
def test_crop_and_pad_give_the_band_limited_samples_exactly(P, D):
    """Cosines below both Nyquists, sampled on P points, resampled to D, equal the same cosines sampled on
    D points: for crops and pads, odd and even windows, and with the window cut out of a larger box."""
    rng = np.random.default_rng(P * 100 + D)
    kmax = min(P, D) // 2 - 1
    terms = [(rng.normal(), int(rng.integers(-kmax, kmax + 1)), int(rng.integers(-kmax, kmax + 1)),
              rng.uniform(0, 2 * np.pi)) for _ in range(6)]
    x = torch.from_numpy(_cosines(P, 100.0, terms)[None])
    expected = _cosines(D, 100.0, terms)
    np.testing.assert_allclose(fourier_resize_real(x, D)[0].numpy(), expected, atol=1e-11)
    big = torch.zeros((1, P + 7 + P % 2, P + 7 + P % 2), dtype=torch.float64)  # even box, window inside
    a = big.shape[-1] // 2 - P // 2
    big[0, a:a + P, a:a + P] = x[0]
    np.testing.assert_allclose(fourier_resize_real(big, D, P)[0].numpy(), expected, atol=1e-11)


def test_pad_splits_the_old_nyquist_term_into_the_real_interpolant():
    """On an even window, cos(π·n) is the Nyquist term, and cos(2π(3x ± P/2·y)/L) give the same samples;
    padded, they must become the real interpolants cos(2π·(P/2)x/L) and cos(2π·3x/L)·cos(2π·(P/2)y/L)."""
    P, D, L = 16, 40, 50.0
    x = _cosines(P, L, [(1.0, P // 2, 0, 0.0), (0.5, 3, P // 2, 0.0)])
    got = fourier_resize_real(torch.from_numpy(x[None]), D)[0].numpy()
    c = (np.arange(D) - D // 2) * L / D
    yy, xx = np.meshgrid(c, c, indexing="ij")
    k = 2 * np.pi / L
    expected = np.cos(k * 8 * xx) + 0.5 * np.cos(k * 3 * xx) * np.cos(k * 8 * yy)
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_matrix_crop_differs_from_the_fft_crop_only_in_the_corner_term():
    """The matrix (separable) crop folds all four (±D/2, ±D/2) terms into the corner, the FFT crop two of
    them; every other Fourier coefficient agrees."""
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(4, 64, 64)))
    M = torch.from_numpy(resample_matrix(64, 64, 32))
    diff = torch.fft.fft2(M @ x @ M.T - fourier_crop_real(x, 32)).abs()
    assert diff[:, 16, 16].min() > 1e-3  # the (-16, -16) term (index 16 of an FFT of 32)
    diff[:, 16, 16] = 0
    assert diff.max() < 1e-10


# ---- the plan and its limits ---------------------------------------------------------------------------

def _table(tmp_path, groups: list[tuple[float, int]], n_per_group: int = 4, image=None, interleave=True):
    """A RELION 3.1 STAR + one stack per optics group (apix, box), imported; images from `image(apix, box,
    i)` (default: Gaussian blobs in Å, the same object in every group). Rows alternate between groups."""
    image = image or _blobs
    names, og = [], []
    for g, (apix, box) in enumerate(groups, 1):
        data = np.stack([image(apix, box, i) for i in range(n_per_group)]).astype(np.float32)
        write_stack(tmp_path / "stacks" / f"g{g}.mrcs", data, apix)
    order = ([(i, g) for i in range(n_per_group) for g in range(1, len(groups) + 1)] if interleave
             else [(i, g) for g in range(1, len(groups) + 1) for i in range(n_per_group)])
    for i, g in order:
        names.append(f"{i + 1:06d}@stacks/g{g}.mrcs")
        og.append(g)
    particles = default_particles(names, np.random.default_rng(0))
    particles["rlnOpticsGroup"] = og
    optics = {"rlnOpticsGroupName": [f"s{g}" for g in range(1, len(groups) + 1)],
              "rlnOpticsGroup": list(range(1, len(groups) + 1)), "rlnVoltage": [300.0] * len(groups),
              "rlnSphericalAberration": [2.7] * len(groups), "rlnAmplitudeContrast": [0.1] * len(groups),
              "rlnImagePixelSize": [a for a, _ in groups], "rlnImageSize": [b for _, b in groups],
              "rlnImageDimensionality": [2] * len(groups)}
    star = tmp_path / "particles.star"
    star.write_text(star_text(particles, optics))
    table = tmp_path / "table.star"
    assert main(["import", str(star), "-o", str(table)]) == 0
    return table, order


BLOBS = [((-12.0, 5.0), 7.0, 1.0), ((10.0, -8.0), 6.0, 0.8), ((3.0, 14.0), 8.0, 0.6)]  # centre Å, σ Å, amp


def _blob_image(apix: float, box: int, shift: float = 0.0) -> np.ndarray:
    """Gaussian blobs (σ 6–8 Å: their spectrum is below 1e-5 beyond 1/10 Å) sampled at `apix` on `box` px."""
    c = (np.arange(box) - box // 2) * apix
    y, x = np.meshgrid(c, c, indexing="ij")
    return sum(a * np.exp(-((x - cx - shift) ** 2 + (y - cy) ** 2) / (2 * s * s)) for (cx, cy), s, a in BLOBS)


def _blobs(apix: float, box: int, i: int) -> np.ndarray:
    return _blob_image(apix, box, shift=float(i))  # each particle its own image


def test_one_pixel_size_is_planned_as_before(tmp_path):
    table, _ = _table(tmp_path, [(1.5, 32)])
    plan = plan_resampling(read_table(table), 16)
    assert (plan.apix, plan.mixed, [g.window for g in plan.groups]) == (3.0, False, [32])
    with pytest.raises(InputError, match="-D 34 is larger than the original box 32; downsampling cannot "
                                         "upsample"):
        plan_resampling(read_table(table), 34)


def test_plan_for_124_and_125_angstrom_at_a_256_box():
    """1.24 Å × 256 = 317.44 Å is the smaller box; 317.44 / 1.25 = 253.95 → a 254-px window, 317.5 Å:
    ε = 0.06 / 317.44 = 1.9e-4, 0.012 px at the edge of a 128-px image — below the 0.02 px goal, so nothing
    more is cut off."""
    import pandas as pd

    from drgn_core.io.table import ParticleTable

    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnImagePixelSize": [1.24, 1.25],
                           "rlnImageSize": [256, 256]})
    t = ParticleTable(pd.DataFrame({"rlnOpticsGroup": [1, 2, 2]}), optics)
    plan = plan_resampling(t, 128)
    assert [g.window for g in plan.groups] == [256, 254] and [g.n for g in plan.groups] == [1, 2]
    assert plan.apix == pytest.approx(317.44 / 128, rel=1e-12)
    assert plan.groups[1].apix == pytest.approx(317.5 / 128, rel=1e-12)
    assert plan.residual_px == pytest.approx(0.06 / 317.44 * 64, rel=1e-9)
    # At 128 px (159 Å) the best whole windows are 128 and 127 (158.75 Å): ε 1.9e-4 again.
    t.optics["rlnImageSize"] = [128, 128]
    assert [g.window for g in plan_resampling(t, 32).groups] == [128, 127]


def test_a_stretch_that_resampling_cannot_hide_is_refused_with_the_figures(tmp_path):
    """1.0 vs 1.07 Å at 38 px, -D 38: the windows 38 and 36 px (38 / 1.07 = 35.5; 35 px would need 1.5 px of
    padding per edge) leave ε = (36·1.07 − 38)/38 = 1.4 %, 19·0.0137 = 0.26 px at the edge of a 38-px
    image (limit 0.25 px); at -D 36 it is 0.246 px."""
    table, _ = _table(tmp_path, [(1.0, 38), (1.07, 38)], n_per_group=1)
    assert main(["downsample", str(table), "-D", "38", "-o", str(tmp_path / "p.mrcs")]) == 2
    with pytest.raises(InputError) as e:
        plan_resampling(read_table(table), 38)
    assert str(e.value) == (
        f"{table}: optics groups 1 (1 Å/px, 38 px, n=1), 2 (1.07 Å/px, 38 px, n=1) differ in pixel size by "
        "more than -D 38 can hide: the closest whole-pixel windows (38, 36 px) still leave group 2 1.4 % off "
        "the common 1 Å/px, which moves the edge of a 38-px image by 0.26 px (limit 0.25 px); use -D 36 or "
        "smaller")
    assert not (tmp_path / "p.mrcs").exists() and not (tmp_path / "p.json").exists()
    assert plan_resampling(read_table(table), 36).residual_px <= 0.25


def test_124_and_125_angstrom_at_a_64_px_box_pass_at_every_size_up_to_the_box(tmp_path):
    """Whole windows leave at most half an original pixel over the window: ε·D/2 ≤ D/(4·window) ≤ 0.25 px
    for every -D up to the window; the 63-px window of the 1.25 Å group is padded by 0.5 px at -D 64."""
    table, _ = _table(tmp_path, [(1.24, 64), (1.25, 64)], n_per_group=1)
    t = read_table(table)
    for D in range(2, 66, 2):
        plan = plan_resampling(t, D)
        assert plan.residual_px <= 0.25
    assert [g.window for g in plan_resampling(t, 64).groups] == [64, 63]
    with pytest.raises(InputError, match=r"would be Fourier-padded by 1\.5 px per edge"):
        plan_resampling(t, 66)


def test_a_group_asked_beyond_its_nyquist_is_refused_with_the_figures(tmp_path):
    """1.0 and 1.25 Å at 64 px: the common box is 64 Å; at -D 64 (1.0 Å/px) the 1.25 Å group's 51-px
    window would be padded by 6.5 px per edge; 52 px would pad it by 0.5 px."""
    table, _ = _table(tmp_path, [(1.0, 64), (1.25, 64)], n_per_group=1)
    with pytest.raises(InputError) as e:
        plan_resampling(read_table(table), 64)
    assert str(e.value) == (
        f"{table}: optics groups 1 (1 Å/px, 64 px, n=1), 2 (1.25 Å/px, 64 px, n=1) differ in pixel size "
        "by more than resampling can hide at -D 64: group 2 holds nothing finer than 2.5 Å (its Nyquist), "
        "but a 64-px stack at the common 1 Å/px reaches 2 Å, so its 51-px window would be Fourier-padded "
        "by 6.5 px per edge (limit 1); use -D 52 or smaller")
    assert [g.window for g in plan_resampling(read_table(table), 52).groups] == [64, 51]
    plan = plan_resampling(read_table(table), 40)  # 64 Å = 64 × 1.0 = 51.2 × 1.25: windows 64, 51
    assert [g.window for g in plan.groups] == [64, 51] and plan.apix == pytest.approx(1.6)


# ---- downsampling a mixed table ------------------------------------------------------------------------

@pytest.mark.parametrize("interleave", [True, False])
def test_mixed_pixel_sizes_and_boxes_land_on_one_grid(tmp_path, capsys, interleave):
    """Groups at 1.24 Å (128 px), 1.25 Å (120 px) and 1.0 Å (160 px) hold the same blobs. The common box is
    150 Å (windows 121, 120 and 150 px; 121·1.24 = 150.04 Å, ε 2.7e-4); after downsampling to 32 px every
    image is the blobs sampled on the common grid (to 1e-3 of the peak; treating 1.25 Å as 1.24 Å instead
    would be off by 1.4e-2), and the sidecar records each group's resampling."""
    groups = [(1.24, 128), (1.25, 120), (1.0, 160)]
    table, order = _table(tmp_path, groups, n_per_group=3, interleave=interleave)
    out = tmp_path / "p.32.mrcs"
    assert main(["downsample", str(table), "-D", "32", "-o", str(out), "--chunk", "4"]) == 0
    said = capsys.readouterr().out
    stack = open_stack(out, read_table(table))
    plan = plan_resampling(read_table(table), 32)
    assert stack.apix == pytest.approx(plan.apix) and stack.D == 32
    assert [g.window for g in plan.groups] == [121, 120, 150] and plan.apix == 150 / 32
    assert "3 images of 120 px at 1.25 Å/px, window 120 px, scale 0.2667" in said
    for row, (i, _) in enumerate(order):
        expected = _blob_image(plan.apix, 32, shift=float(i))
        np.testing.assert_allclose(stack.images[row], expected, atol=1e-3, err_msg=f"row {row}")
    wrong = _blob_image(1.24 * 128 / 32, 32) - _blob_image(1.25 * 128 / 32, 32)
    assert np.abs(wrong).max() > 1e-2
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["apix"] == pytest.approx(plan.apix) and meta["extent_A"] == pytest.approx(plan.extent)
    assert [(r["optics_group"], r["apix0"], r["D0"], r["n"]) for r in meta["groups"]] == \
        [(1, 1.24, 128, 3), (2, 1.25, 120, 3), (3, 1.0, 160, 3)]
    for r, g in zip(meta["groups"], plan.groups):
        assert r["window"] == g.window and r["scale"] == pytest.approx(32 / g.window)
        assert r["apix"] == pytest.approx(g.window * g.apix0 / 32)
        assert abs(r["residual"]) * 16 <= 0.1


def test_a_stack_is_checked_against_the_groups_of_its_table(tmp_path):
    table, _ = _table(tmp_path, [(1.24, 64), (1.25, 64)], n_per_group=2)
    out = tmp_path / "p.mrcs"
    assert main(["downsample", str(table), "-D", "16", "-o", str(out)]) == 0
    t = read_table(table)
    t.optics.loc[1, "rlnImagePixelSize"] = 1.26
    with pytest.raises(InputError) as e:
        open_stack(out, t)
    assert str(e.value) == (f"{out}: was made from optics group 2 at 1.25 Å/px, 64 px, but the particle "
                            "table says 1.26 Å/px, 64 px; re-create it with drgn downsample from this table")
    with pytest.raises(InputError, match="optics groups disagree on the pixel size"):
        t.apix  # noqa: B018  (no single pixel size: downstream code must use the stack's)


def test_import_accepts_groups_with_different_pixel_sizes_and_boxes(tmp_path, capsys):
    table, _ = _table(tmp_path, [(1.24, 64), (1.25, 60)], n_per_group=2)
    said = capsys.readouterr().out
    assert "box 60 px at 1.25 Å/px / box 64 px at 1.24 Å/px" in said
    t = read_table(table)
    assert t.optics["rlnImageSize"].tolist() == [64, 60]
    assert t.box_sizes().tolist() == [64, 60, 64, 60]
    assert t.pixel_sizes().tolist() == [1.24, 1.25, 1.24, 1.25]


# ---- bad images ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,what", [(np.nan, "contains NaN pixels"), (np.inf, "contains infinite pixels"),
                                      (0.0, "is all zeros")])
def test_bad_images_are_named_by_their_original_stack_and_number(tmp_path, capsys, bad, what):
    """The bad image is the 3rd of the second group's stack (table row 5 when rows alternate); the error
    names that stack and number, the run exits 2, and nothing is written."""
    def image(apix: float, box: int, i: int) -> np.ndarray:
        img = _blobs(apix, box, i)
        if apix == 1.25 and i == 2:
            if bad == 0.0:
                img[:] = 0.0
            else:
                img[5, 7] = bad
        return img

    table, _ = _table(tmp_path, [(1.24, 32), (1.25, 32)], n_per_group=4, image=image)
    out = tmp_path / "p.16.mrcs"
    capsys.readouterr()
    assert main(["downsample", str(table), "-D", "16", "-o", str(out), "--chunk", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    stack = (tmp_path / "stacks" / "g2.mrcs").resolve()
    assert err == (f"drgn downsample: error: {stack}: image 3 {what} (particle table row 5, 0-based); remove "
                   "that particle from the table, or repair the stack")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["particles.star", "stacks", "table.star"]


def test_stacks_of_one_optics_group_must_share_a_box(tmp_path, capsys):
    """Groups may differ in box; the stacks of one group may not (the message names them)."""
    from helpers_io import default_optics

    for k, box in enumerate((8, 10)):
        write_stack(tmp_path / "stacks" / f"s{k}.mrcs", np.ones((2, box, box)), 2.0)
    names = [f"{i + 1:06d}@stacks/s{k}.mrcs" for k in range(2) for i in range(2)]
    star = tmp_path / "particles.star"
    star.write_text(star_text(default_particles(names, np.random.default_rng(0)), default_optics(8, 2.0)))
    assert main(["import", str(star), "-o", str(tmp_path / "t.star")]) == 2
    err = capsys.readouterr().err
    assert ("stacks have different image sizes: 8×8 (stacks/s0.mrcs), 10×10 (stacks/s1.mrcs); drgnflow needs "
            "one box size per optics group") in err
    assert not (tmp_path / "t.star").exists()


def test_cs_blob_shape_gives_each_optics_group_its_box():
    from drgn_core.io.cs import _box_per_group

    d = {"blob/shape": np.array([[64, 64], [60, 60], [64, 64]], dtype=np.uint32)}
    problems: list[str] = []
    assert _box_per_group(d, {"blob/shape"}, np.array([1, 2, 1]), 2, problems).tolist() == [64, 60]
    assert problems == []
    _box_per_group(d, {"blob/shape"}, np.array([1, 1, 1]), 1, problems)
    assert problems == ["blob/shape differs between particles of one optics group (64×64, 60×60); drgnflow "
                        "needs one box size per optics group"]
