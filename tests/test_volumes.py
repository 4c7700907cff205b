"""Writing volume series, low-pass filtering, hand flipping and latent-value parsing (drgn_core.volumes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drgn_core.errors import DrgnError, InputError
from drgn_core.fourier import fft3_center, lattice_3d
from drgn_core.io.mrc import read_mrc
from drgn_core.models import HetVAE, ModelConfig, generate_volumes, model_payload
from drgn_core.rundir import write_volumes
from drgn_core.volumes import (
    flip_hand,
    lowpass,
    parse_z_values,
    read_z_file,
    volume_name,
    write_volume_series,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_series_files_voxel_size_and_z_values(tmp_path):
    vols = np.random.default_rng(0).normal(size=(3, 8, 8, 8)).astype(np.float32)
    z = np.array([[0.1, -2.0], [0.5, 0.0], [1e-3, 7.25]])
    paths = write_volume_series(vols, z, tmp_path, apix=2.5)
    assert [p.name for p in paths] == ["vol_000.mrc", "vol_001.mrc", "vol_002.mrc"]
    for p, v in zip(paths, vols):
        data, apix = read_mrc(p, mmap=False)
        assert apix == pytest.approx(2.5) and np.array_equal(data, v)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "z_values.txt", ndmin=2), z)
    # a shorter series replaces the old one entirely; another prefix coexists
    write_volume_series(vols[:1], z[:1], tmp_path, apix=2.5)
    write_volume_series(vols[:2], z[:2], tmp_path, apix=2.5, prefix="kmeans")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["kmeans_000.mrc", "kmeans_001.mrc", "kmeans_maps.png", "kmeans_z_values.txt", "maps.png",
                     "vol_000.mrc", "z_values.txt"]
    assert not list(tmp_path.glob(".*part"))


def test_volume_names_widen_past_a_thousand():
    assert volume_name("vol", 7, 10) == "vol_007.mrc"
    assert volume_name("vol", 7, 1001) == "vol_0007.mrc"


def test_lowpass_keeps_low_and_removes_high_frequencies():
    D, apix = 32, 2.0
    x = lattice_3d(D)[..., 0] * D                       # x coordinate in px
    low = np.cos(2 * np.pi * 2 * x / D)                  # 2 cycles per box: 32 Å period
    high = np.cos(2 * np.pi * 10 * x / D)                # 10 cycles per box: 6.4 Å period
    out = lowpass(low + high, apix, resolution_A=12.0)
    np.testing.assert_allclose(out, low, atol=1e-5)
    with pytest.raises(DrgnError, match="finer than Nyquist"):
        lowpass(low, apix, 3.0)


def test_flip_hand_mirrors_z_about_the_centre():
    v = np.random.default_rng(1).normal(size=(8, 8, 8))
    f = flip_hand(v)
    assert np.array_equal(flip_hand(f), v)
    assert np.array_equal(f[4], v[4]) and np.array_equal(f[1], v[7]) and np.array_equal(f[0], v[0])
    # the transform of the mirror image is the transform with kz → -kz
    F, Ff = fft3_center(v), fft3_center(f)
    assert np.allclose(Ff[3], F[5]) and np.allclose(Ff[6], F[2])


def test_parse_z_values_groups_by_zdim(tmp_path):
    z = parse_z_values(["0.1,0.5", "1 2"], None, 1)
    np.testing.assert_allclose(z, [[0.1], [0.5], [1], [2]], rtol=1e-7)
    np.testing.assert_allclose(parse_z_values(["0.1,0.5"], None, 2), [[0.1, 0.5]], rtol=1e-7)
    with pytest.raises(DrgnError, match="gave 3 numbers; the model's zdim is 2"):
        parse_z_values(["1,2,3"], None, 2)
    with pytest.raises(DrgnError, match="'abc' is not a number"):
        parse_z_values(["1,abc"], None, 2)
    with pytest.raises(DrgnError, match="give latent values"):
        parse_z_values(None, None, 2)
    txt = tmp_path / "z.txt"
    txt.write_text("# comment\n1 2\n3 4\n")
    np.testing.assert_array_equal(parse_z_values(["9,9"], txt, 2), [[9, 9], [1, 2], [3, 4]])


def test_read_z_file_checks_shape(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(6.0))
    assert read_z_file(tmp_path / "a.npy", 1).shape == (6, 1)
    with pytest.raises(InputError, match=r"a.npy: holds an array of shape \(6,\); the model needs \(m, 2\)"):
        read_z_file(tmp_path / "a.npy", 2)
    with pytest.raises(InputError, match="no such file"):
        read_z_file(tmp_path / "missing.txt", 2)


def test_write_volumes_voxel_size_resampling_and_filters(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(D=16, zdim=1, enc_dim=8, enc_layers=1, dec_dim=16, dec_layers=1, apix=3.0,
                      norm_scale=2.0)
    model = HetVAE(cfg, generator=torch.Generator().manual_seed(0))
    torch.save(model_payload(model, cfg), tmp_path / "model.pt")
    z = np.array([[0.3]], dtype=np.float32)
    paths = write_volumes(tmp_path, z, tmp_path / "a")
    v, apix = read_mrc(paths[0], mmap=False)
    assert apix == pytest.approx(3.0)
    np.testing.assert_allclose(v, generate_volumes(model, cfg, z)[0], rtol=1e-5, atol=1e-6)
    v24, apix24 = read_mrc(write_volumes(tmp_path, z, tmp_path / "b", D=24)[0], mmap=False)
    assert v24.shape == (24, 24, 24) and apix24 == pytest.approx(2.0)
    vf, _ = read_mrc(write_volumes(tmp_path, z, tmp_path / "c", flip=True, apix=1.5)[0], mmap=False)
    np.testing.assert_allclose(vf, flip_hand(v), rtol=1e-6, atol=1e-6)
    vl, _ = read_mrc(write_volumes(tmp_path, z, tmp_path / "d", lowpass_A=12.0)[0], mmap=False)
    np.testing.assert_allclose(vl, lowpass(v, 3.0, 12.0), rtol=1e-5, atol=1e-6)
    with pytest.raises(DrgnError, match="-D must be an even box size"):
        write_volumes(tmp_path, z, tmp_path / "e", D=15)
