"""`drgn downsample`: Fourier cropping (exact and analytic), pixel size, streaming, sign, float16, errors."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import torch
from helpers_io import FIXTURE, small_dataset, write_stack

from drgn_core.cli import main
from drgn_core.downsample import downsample_table, fourier_crop_real
from drgn_core.fourier import downsample_images
from drgn_core.importing import import_particles
from drgn_core.io import open_stack, read_images, read_table

torch.set_num_threads(1)


@pytest.mark.parametrize("D0,D", [(64, 32), (48, 46), (10, 2), (16, 16)])
def test_half_spectrum_crop_equals_centred_crop(D0, D):
    x = np.random.default_rng(D0 + D).normal(size=(3, D0, D0))
    np.testing.assert_allclose(fourier_crop_real(torch.from_numpy(x), D).numpy(), downsample_images(x, D),
                               atol=1e-12)


def _wave(D: int, fx: int, fy: int) -> np.ndarray:
    """cos(2π(fx·x + fy·y)/D), x and y in pixels from the centre (index D/2): fx, fy cycles per box."""
    c = np.arange(D) - D // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    return np.cos(2 * np.pi * (fx * x + fy * y) / D)


def test_sinusoid_below_new_nyquist_survives_exactly_and_above_is_removed():
    D0, D = 64, 32
    below = torch.from_numpy(_wave(D0, 5, -11)[None])
    np.testing.assert_allclose(fourier_crop_real(below, D)[0].numpy(), _wave(D, 5, -11), atol=1e-12)
    above = torch.from_numpy(_wave(D0, 17, 3)[None])  # 17 cycles > 16 = the new Nyquist
    np.testing.assert_allclose(fourier_crop_real(above, D)[0].numpy(), 0.0, atol=1e-12)
    mixed = torch.from_numpy((2.5 * _wave(D0, 3, 4) + _wave(D0, 0, 20) + 0.7)[None])
    np.testing.assert_allclose(fourier_crop_real(mixed, D)[0].numpy(), 2.5 * _wave(D, 3, 4) + 0.7, atol=1e-12)


def test_cli_downsample_pixel_size_rows_and_streaming(tmp_path, capsys):
    star, images = small_dataset(tmp_path, box=16, counts=(9, 6, 8), apix=1.5)
    table = tmp_path / "t.star"
    assert main(["import", str(star), "-o", str(table)]) == 0
    out = tmp_path / "particles.8.mrcs"
    assert main(["downsample", str(table), "-D", "8", "-o", str(out), "--chunk", "7"]) == 0
    assert "23 images of 8×8 px at 3 Å/px (from 16 px at 1.5 Å/px)" in capsys.readouterr().out
    with mrcfile.open(out) as m:
        assert m.voxel_size.x == pytest.approx(3.0) and m.data.shape == (23, 8, 8) and m.header.mode == 2
        got = np.array(m.data)
        assert (m.header.dmin, m.header.dmax) == (got.min(), got.max())
        assert m.header.dmean == pytest.approx(got.mean(), abs=1e-6)
        assert m.header.rms == pytest.approx(got.std(), rel=1e-5)
    # Streaming in chunks of 7 across three stacks == the whole set cropped in memory.
    np.testing.assert_allclose(got, downsample_images(images.astype(np.float64), 8), atol=1e-5)
    s = open_stack(out, table=read_table(table))
    assert (s.D, s.apix, s.D0, s.apix0, s.n, s.dtype) == (8, 3.0, 16, 1.5, 23, "float32")


def test_downsample_applies_the_image_sign(tmp_path):
    """A .cs with blob/sign = -1 (dark stack) and the STAR of the same bright particles give one stack."""
    for name in ("particles.cs", "particles_relion31.star"):
        assert main(["import", str(FIXTURE / name), "-o", str(tmp_path / f"{name}.table.star")]) == 0
        assert main(["downsample", str(tmp_path / f"{name}.table.star"), "-D", "32", "-o",
                     str(tmp_path / f"{name}.32.mrcs"), "--chunk", "150"]) == 0
    a = open_stack(tmp_path / "particles.cs.32.mrcs").images
    b = open_stack(tmp_path / "particles_relion31.star.32.mrcs").images
    np.testing.assert_allclose(a, b, atol=1e-6)
    t = import_particles(FIXTURE / "particles_relion31.star")
    np.testing.assert_allclose(b[:5], downsample_images(read_images(t, np.arange(5)).astype(np.float64), 32),
                               atol=1e-5)


def test_full_size_is_a_signed_copy_and_float16(tmp_path):
    star, images = small_dataset(tmp_path, counts=(5,))
    t = import_particles(star)
    t.particles["drgnImageSign"] = -1
    s = downsample_table(t, 8, tmp_path / "copy.mrcs", chunk=2, progress=False)
    np.testing.assert_array_equal(s.images, -images)
    h = downsample_table(t, 4, tmp_path / "half.mrcs", float16=True, progress=False)
    assert h.images.dtype == np.float16 and h.dtype == "float16"
    with mrcfile.open(tmp_path / "half.mrcs", header_only=True) as m:
        assert int(m.header.mode) == 12
    np.testing.assert_allclose(h.images.astype(np.float32), downsample_images(-images.astype(np.float64), 4),
                               rtol=2e-3, atol=2e-3)


def test_float16_range_is_checked(tmp_path, capsys):
    star, images = small_dataset(tmp_path, counts=(3,))
    write_stack(tmp_path / "stacks" / "s0.mrcs", images * 1e6, 2.0)
    assert main(["import", str(star), "-o", str(tmp_path / "t.star")]) == 0
    out = tmp_path / "p.4.mrcs"
    assert main(["downsample", str(tmp_path / "t.star"), "-D", "4", "-o", str(out), "--float16"]) == 2
    assert "beyond float16's range" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "p.4.json").exists()


@pytest.mark.parametrize("D,why", [(7, "-D 7: the new box must be an even number ≥ 2"),
                                   (10, "-D 10 is larger than the original box 8; downsampling cannot "
                                        "upsample")])
def test_bad_target_size(tmp_path, capsys, D, why):
    star, _ = small_dataset(tmp_path)
    table = tmp_path / "t.star"
    assert main(["import", str(star), "-o", str(table)]) == 0
    out = tmp_path / "p.mrcs"
    assert main(["downsample", str(table), "-D", str(D), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == f"drgn downsample: error: {table}: {why}"
    assert not out.exists() and not list(tmp_path.glob(".p.mrcs*"))


def test_stale_sidecar_is_replaced(tmp_path):
    star, _ = small_dataset(tmp_path)
    t = import_particles(star)
    out = tmp_path / "p.mrcs"
    downsample_table(t, 4, out, progress=False)
    s = downsample_table(t, 6, out, progress=False)
    assert (s.D, open_stack(out).D) == (6, 6)
