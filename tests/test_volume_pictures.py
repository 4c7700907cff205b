"""Maps as pictures (drgn_core.plots.volume_views / volume_sheet) and the contact sheet every map series gets.

The sheet's panels are placed pixel for pixel, so these tests read the PNG back and compare each panel with
the grey levels of the array slice or sum it should show: a view taken through the wrong index, summed
along the wrong axis, drawn in the wrong row or on a per-map grey scale fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest_latent import add_tiny_model, make_run
from matplotlib.image import imread

from drgn_core import plots
from drgn_core.cli import main
from drgn_core.io.mrc import read_mrc
from drgn_core.volumes import sheet_name, write_volume_series


def _png(path) -> np.ndarray:
    """The PNG as 8-bit RGB."""
    return np.round(imread(path)[..., :3] * 255).astype(np.uint8)


def _panel(img: np.ndarray, sheet: plots.ContactSheet, r: int, c: int) -> np.ndarray:
    top, left = sheet.boxes[r][c]
    return img[top:top + sheet.panel, left:left + sheet.panel]


def _expected(view: np.ndarray, sheet: plots.ContactSheet, c: int) -> np.ndarray:
    """What panel column c must hold for `view`, computed here without the module's resize helper."""
    lo, hi = sheet.scales["slice" if c < 3 else "projection"]
    if sheet.block > 1:
        b = sheet.block
        n = view.shape[0] // b * b
        view = view[:n, :n].reshape(n // b, b, n // b, b).mean(axis=(1, 3))
    grey = np.round(255 * np.clip((view - lo) / (hi - lo), 0, 1)).astype(np.uint8)
    return np.kron(grey, np.ones((sheet.repeat, sheet.repeat), dtype=np.uint8))


def _separable(D: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """vol[z, y, x] = a[z] b[y] c[x]: every slice and sum has a closed form."""
    rng = np.random.default_rng(seed)
    a, b, c = (rng.uniform(0.2, 1.0, D) for _ in range(3))
    return np.einsum("i,j,k->ijk", a, b, c), a, b, c


def test_views_are_central_slices_and_sums_along_the_right_axis():
    D = 12
    vol, a, b, c = _separable(D, 0)
    views = plots.volume_views(vol)
    assert views.shape == (6, D, D) and views.dtype == np.float32
    expected = [a[D // 2] * np.outer(b, c), b[D // 2] * np.outer(a, c), c[D // 2] * np.outer(a, b),
                a.sum() * np.outer(b, c), b.sum() * np.outer(a, c), c.sum() * np.outer(a, b)]
    for got, want, name in zip(views, expected, plots.VIEW_NAMES):
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
    # one bright voxel at (z, y, x) = (3, 8, 10) lands where each view's axes say it should
    spot = np.zeros((D, D, D))
    spot[3, 8, 10] = 1.0
    v = plots.volume_views(spot)
    assert v[0].sum() == 0 and v[1].sum() == 0 and v[2].sum() == 0      # off every central plane
    assert [tuple(np.argwhere(p)[0]) for p in v[3:]] == [(8, 10), (3, 10), (3, 8)]
    with pytest.raises(ValueError, match=r"expected a cubic map \(D, D, D\), got shape \(4, 4, 5\)"):
        plots.volume_views(np.zeros((4, 4, 5)))


def test_sheet_panels_hold_each_maps_views_on_one_grey_scale(tmp_path):
    D = 16
    base, *_ = _separable(D, 1)
    vols = np.stack([base, 2.0 * base, -base])                 # same shape, different strength and sign
    sheet = plots.volume_sheet(vols, tmp_path / "s.png", names=["one", "two", "three"], title="t")
    img = _png(tmp_path / "s.png")
    assert sheet.shown == [0, 1, 2] and (sheet.repeat, sheet.block, sheet.panel) == (8, 1, 128)
    views = np.stack([plots.volume_views(v) for v in vols])
    for kind, cols in (("slice", slice(0, 3)), ("projection", slice(3, 6))):
        np.testing.assert_allclose(sheet.scales[kind], np.percentile(views[:, cols], plots.GREY_PERCENTILES))
    for r in range(3):
        for c in range(6):
            want = np.repeat(_expected(views[r, c], sheet, c)[..., None], 3, axis=2)   # grey: R = G = B
            assert np.array_equal(_panel(img, sheet, r, c), want), (r, c)
    # one scale for the series: the doubled map is brighter than the first, the negated one darker
    mean = [[_panel(img, sheet, r, c).mean() for c in range(6)] for r in range(3)]
    assert all(mean[2][c] < mean[0][c] < mean[1][c] for c in range(6))
    # the panels sit on a white page, with room on the left for the names
    top, left = sheet.boxes[0][0]
    assert (img[:top, :] == 255).mean() > 0.9 and left >= 64


def test_long_series_show_evenly_spaced_maps_and_big_boxes_are_averaged(tmp_path):
    # map i is constant i: the grey of a row's panel tells which map it shows
    vols = np.arange(45, dtype=np.float32)[:, None, None, None] * np.ones((1, 8, 8, 8), np.float32)
    sheet = plots.volume_sheet(vols, tmp_path / "long.png")
    assert len(sheet.shown) == plots.MAX_SHEET_ROWS and sheet.shown[0] == 0 and sheet.shown[-1] == 44
    img = _png(tmp_path / "long.png")
    lo, hi = sheet.scales["slice"]
    for r, i in enumerate(sheet.shown):
        assert np.all(_panel(img, sheet, r, 0) == round(255 * np.clip((i - lo) / (hi - lo), 0, 1))), r
    assert img.shape[0] == sheet.boxes[-1][0][0] + sheet.panel + 4
    # D = 320 > PANEL_PX: 3 × 3 blocks averaged, the last 2 voxels of each axis dropped
    big = np.random.default_rng(2).normal(size=(1, 320, 320, 320)).astype(np.float32)
    sheet = plots.volume_sheet(big, tmp_path / "big.png")
    assert (sheet.block, sheet.repeat, sheet.panel) == (3, 1, 106)
    img = _png(tmp_path / "big.png")
    views = plots.volume_views(big[0])
    for c in (0, 4):
        assert np.array_equal(_panel(img, sheet, 0, c)[..., 0], _expected(views[c], sheet, c))
    with pytest.raises(ValueError, match="no maps to picture"):
        plots.volume_sheet(np.zeros((0, 4, 4, 4)), tmp_path / "none.png")


def test_every_series_writes_its_sheet_beside_the_maps(tmp_path):
    vols = np.random.default_rng(3).normal(size=(2, 8, 8, 8)).astype(np.float32)
    write_volume_series(vols, None, tmp_path / "a", apix=2.0)
    write_volume_series(vols[:1], None, tmp_path / "a", apix=2.0, prefix="km")
    write_volume_series(vols, None, tmp_path / "b", apix=2.0, picture=False)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == ["km_maps.png", "maps.png"]
    assert sheet_name("vol") == "maps.png" and sheet_name("km") == "km_maps.png"
    assert not list((tmp_path / "b").glob("*.png"))
    # two rows in the series' own sheet, one in the km sheet: the image heights differ by one row
    h2, h1 = _png(tmp_path / "a" / "maps.png").shape[0], _png(tmp_path / "a" / "km_maps.png").shape[0]
    assert h2 - h1 == 128 + 4


def _check_sheet_shows(folder, n_maps: int, tmp_path) -> None:
    """folder/maps.png pictures exactly the folder's vol_NNN.mrc (re-rendered here to find the panels)."""
    maps = sorted(folder.glob("vol_*.mrc"))
    assert len(maps) == n_maps, folder
    vols = np.stack([read_mrc(p, mmap=False)[0] for p in maps])
    ref = plots.volume_sheet(vols, tmp_path / "ref.png", names=[p.stem for p in maps], title="x")
    img = _png(folder / "maps.png")
    for r in range(n_maps):
        views = plots.volume_views(vols[r])
        for c in range(6):
            assert np.array_equal(_panel(img, ref, r, c)[..., 0], _expected(views[c], ref, c)), (folder, r, c)


def test_volumes_analyze_and_traverse_commands_write_the_picture(tmp_path, capsys):
    rng = np.random.default_rng(4)
    run = make_run(tmp_path / "run", rng.normal(size=(60, 2)).astype(np.float32))
    add_tiny_model(run, zdim=2, D=16)
    assert main(["volumes", str(run), "-o", str(tmp_path / "v"), "--z=0,0", "--z=1,-1", "--z=-2,1"]) == 0
    assert f"picture: {tmp_path / 'v' / 'maps.png'}" in capsys.readouterr().out
    _check_sheet_shows(tmp_path / "v", 3, tmp_path)
    assert main(["analyze", str(run), "-o", str(tmp_path / "an"), "--ksample", "3", "--pc", "1",
                 "--pc-points", "4", "--skip-umap"]) == 0
    _check_sheet_shows(tmp_path / "an" / "kmeans3", 3, tmp_path)
    _check_sheet_shows(tmp_path / "an" / "pc1", 4, tmp_path)
    assert main(["traverse", str(run), "-o", str(tmp_path / "tr"), "--method", "linear", "--anchors", "0,1",
                 "--n", "5", "--max-volumes", "5"]) == 0
    _check_sheet_shows(tmp_path / "tr" / "volumes", 5, tmp_path)
