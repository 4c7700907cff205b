"""Back-projection: the conventions fixture at its true poses, analytic particles against their exact
volume, half maps and their FSC, and `drgn backproject` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from drgn_core.backproject import (
    FourierInserter,
    backproject_table,
    reconstruct,
    split_halves,
)
from drgn_core.cli import main
from drgn_core.ctf import ctf_from_params
from drgn_core.fourier import ifft2_center, ifft3_center, lattice_2d, lattice_3d
from drgn_core.fsc import crossing, fsc_curve
from drgn_core.io.mrc import read_mrc, write_mrc
from drgn_core.io.table import ParticleTable, read_table, write_table
from drgn_core.pose import matrix_to_euler, random_poses
from drgn_core.volumes import lowpass

FIXTURE = Path(__file__).resolve().parent / "data" / "conventions"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# ---- the conventions fixture at its true poses ----------------------------------------------------------
def fixture_truth():
    t = np.load(FIXTURE / "truth.npz")
    n, apix = len(t["A"]), float(t["apix"])
    ctf = np.column_stack([np.full(n, apix), t["defocus_u"], t["defocus_v"], t["defocus_angle_deg"],
                           t["voltage_kv"], t["cs_mm"], t["amp_contrast"], t["phase_shift_deg"], np.zeros(n)])
    return t["A"], t["origin_A"] / apix, ctf, apix


@pytest.mark.parametrize("interpolation", ["trilinear", "nearest"])
def test_fixture_check4_clean_reconstruction_has_the_right_hand(interpolation):
    A, shifts, ctf, apix = fixture_truth()
    images, _ = read_mrc(FIXTURE / "clean.mrcs", mmap=False)
    volume, _ = read_mrc(FIXTURE / "volume.mrc", mmap=False)
    n, D = images.shape[0], images.shape[-1]
    halves = split_halves(np.arange(n), None, 0)
    rec = reconstruct(lambda pos: images[pos], n, D, apix, A, shifts, ctf, halves,
                      interpolation=interpolation, progress=False)
    assert corr(rec.map, volume) >= 0.95
    assert corr(rec.map, volume[::-1]) <= 0.6
    # without the CTF correction the same images give a much worse map: the CTF is really applied
    plain = reconstruct(lambda pos: images[pos], n, D, apix, A, shifts, None, halves,
                        interpolation=interpolation, progress=False)
    assert corr(plain.map, volume) < corr(rec.map, volume) - 0.05


def test_fixture_noisy_stacks_and_the_shift_sign():
    A, shifts, ctf, apix = fixture_truth()
    images = np.concatenate([read_mrc(FIXTURE / "stacks" / f"part_{s}.mrcs", mmap=False)[0] for s in "ab"])
    volume, _ = read_mrc(FIXTURE / "volume.mrc", mmap=False)
    n, D = images.shape[0], images.shape[-1]
    halves = split_halves(np.arange(n), None, 0)
    rec = reconstruct(lambda pos: images[pos], n, D, apix, A, shifts, ctf, halves, progress=False)
    assert corr(rec.map, volume) >= 0.9
    assert corr(rec.map, volume[::-1]) <= 0.6
    # the opposite shift sign blurs the map: origins re-centre with exp(-2πi k·t)
    wrong = reconstruct(lambda pos: images[pos], n, D, apix, A, -shifts, ctf, halves, progress=False)
    assert corr(wrong.map, volume) < corr(rec.map, volume) - 0.1


@pytest.mark.parametrize("source", ["particles_relion31.star", "particles.cs"])
def test_fixture_through_the_importer_and_the_cli(tmp_path, source, capsys):
    from drgn_core.importing import import_particles

    volume, _ = read_mrc(FIXTURE / "volume.mrc", mmap=False)
    table = import_particles(FIXTURE / source)
    write_table(table, tmp_path / "table.star")
    rc = main(["backproject", str(tmp_path / "table.star"), "-o", str(tmp_path / "bp")])
    assert rc == 0, capsys.readouterr().err
    m, apix = read_mrc(tmp_path / "bp" / "map.mrc", mmap=False)
    assert apix == pytest.approx(3.0)
    assert corr(m, volume) >= 0.9
    assert corr(m, volume[::-1]) <= 0.6
    report = json.loads((tmp_path / "bp" / "fsc.json").read_text())
    assert report["n_particles"] == 400 and report["n_half1"] + report["n_half2"] == 400
    if source.endswith(".star"):
        assert report["split"] == "rlnRandomSubset"   # RELION's own halves are kept
    h1, _ = read_mrc(tmp_path / "bp" / "half1.mrc", mmap=False)
    h2, _ = read_mrc(tmp_path / "bp" / "half2.mrc", mmap=False)
    freq, fsc = fsc_curve(h1, h2)
    np.testing.assert_allclose(report["fsc"], fsc, atol=1e-4)
    assert report["resolution_0.143_A"] == pytest.approx(crossing(freq, fsc, 0.143, 3.0), rel=1e-3)
    assert (tmp_path / "bp" / "fsc.png").stat().st_size > 1000


def test_fixture_downsampled_stack_through_the_cli(tmp_path, capsys):
    """STACK = a drgn downsample stack: its own D and pixel size (shifts and CTF rescaled accordingly)."""
    from drgn_core.downsample import downsample_table
    from drgn_core.fourier import downsample_volume
    from drgn_core.importing import import_particles

    table = import_particles(FIXTURE / "particles_relion31.star")
    write_table(table, tmp_path / "table.star")
    downsample_table(read_table(tmp_path / "table.star"), 32, tmp_path / "particles.32.mrcs", progress=False)
    rc = main(["backproject", str(tmp_path / "table.star"), str(tmp_path / "particles.32.mrcs"),
               "-o", str(tmp_path / "bp")])
    assert rc == 0, capsys.readouterr().err
    m, apix = read_mrc(tmp_path / "bp" / "map.mrc", mmap=False)
    assert m.shape == (32, 32, 32) and apix == pytest.approx(4.5)
    volume = downsample_volume(read_mrc(FIXTURE / "volume.mrc", mmap=False)[0].astype(np.float64), 32)
    assert corr(m, volume) >= 0.9
    assert corr(m, volume[::-1]) <= 0.6


# ---- analytic particles: Gaussian blobs, exact Fourier transforms ---------------------------------------
class Blobs:
    """A volume made of Gaussian blobs, whose continuous Fourier transform is known exactly.

    Projection images are built directly in Fourier space from the transform sampled at Aᵀ·(kx, ky, 0)
    (the projection-slice theorem, exact for the continuous transform), times the CTF and the shift's
    phase ramp; the ground-truth volume is the same transform on the 3D lattice. No interpolation is
    involved, so every error in the reconstruction is the back-projector's.
    """

    def __init__(self, rng: np.random.Generator, n_blobs: int = 16, spread: float = 4.0, sigma: float = 1.0):
        self.centres = rng.normal(0.0, spread, (n_blobs, 3))
        self.amps = rng.uniform(0.5, 1.0, n_blobs)
        self.sigma = sigma

    def ft(self, k: np.ndarray) -> np.ndarray:
        """Transform at k (..., 3) cycles/px (x, y, z), with the unnormalised-DFT scale."""
        s = self.sigma
        arg = 2 * np.pi * (k @ self.centres.T)                  # Σ_j a_j exp(-i·arg_j), as cos and sin
        total = np.cos(arg) @ self.amps - 1j * (np.sin(arg) @ self.amps)
        return total * (2 * np.pi * s**2) ** 1.5 * np.exp(-2 * np.pi**2 * s**2 * (k**2).sum(-1))

    def volume(self, D: int) -> np.ndarray:
        return ifft3_center(self.ft(lattice_3d(D))).real

    def images(self, D: int, A: np.ndarray, displacement_px: np.ndarray, ctf: np.ndarray | None,
               chunk: int = 100) -> np.ndarray:
        k2 = lattice_2d(D).reshape(-1, 2)
        out = np.empty((len(A), D, D), dtype=np.float32)
        for s in range(0, len(A), chunk):   # bounded memory: (chunk, D², n_blobs) phases at a time
            sl = slice(s, s + chunk)
            F = self.ft(np.einsum("pi,nij->npj", k2, A[sl, :2, :]))
            F = F * np.exp(-2j * np.pi * (displacement_px[sl] @ k2.T))
            if ctf is not None:
                F = F * ctf_from_params(k2, ctf[sl])
            out[sl] = ifft2_center(F.reshape(-1, D, D)).real
        return out


def random_ctf(rng: np.random.Generator, n: int, apix: float) -> np.ndarray:
    return np.column_stack([np.full(n, apix), rng.uniform(8000, 20000, n), rng.uniform(8000, 20000, n),
                            rng.uniform(0, 180, n), np.full(n, 300.0), np.full(n, 2.7), np.full(n, 0.1),
                            np.zeros(n), np.zeros(n)])


def simulate(n: int, D: int, apix: float, snr: float | None, seed: int = 0):
    rng = np.random.default_rng(seed)
    blobs = Blobs(rng)
    A = random_poses(n, rng)
    disp = rng.uniform(-2, 2, (n, 2))
    ctf = random_ctf(rng, n, apix)
    images = blobs.images(D, A, disp, ctf)
    if snr is not None:
        images += rng.normal(0, np.sqrt(images.var() / snr), images.shape).astype(np.float32)
    return blobs.volume(D), images, A, -disp, ctf   # RELION origin = -displacement


def test_noise_free_particles_reach_fsc_0143_against_the_truth_at_nyquist():
    D, apix, n = 32, 2.0, 800
    gt, images, A, origins, ctf = simulate(n, D, apix, snr=None)
    rec = reconstruct(lambda pos: images[pos], n, D, apix, A, origins, ctf,
                      split_halves(np.arange(n), None, 1), progress=False)
    freq, fsc = fsc_curve(rec.map, gt)
    assert fsc.min() > 0.95                                  # every shell up to (D/2-1)/D
    assert crossing(freq, fsc, 0.143, apix) == pytest.approx(apix / freq[-1])   # the last shell: ~Nyquist
    assert crossing(freq, fsc, 0.143, apix) < 2.2 * apix


def test_gold_standard_fsc_agrees_with_the_fsc_against_the_truth():
    """Half-map FSC = 0.143 is where the full map's FSC against the truth is 0.5 (Rosenthal & Henderson)."""
    D, apix, n = 32, 2.0, 2000
    gt, images, A, origins, ctf = simulate(n, D, apix, snr=0.05, seed=2)
    rec = reconstruct(lambda pos: images[pos], n, D, apix, A, origins, ctf,
                      split_halves(np.arange(n), None, 3), progress=False, wiener_halves=True)
    gs = crossing(rec.freq, rec.fsc, 0.143, apix)
    freq, fsc_gt = fsc_curve(rec.map, gt)
    truth = crossing(freq, fsc_gt, 0.5, apix)
    assert 2.2 * apix < gs < 4 * apix                         # the noise really limits resolution here
    assert gs == pytest.approx(truth, rel=0.1)
    # each half map alone is worse than the full map against the truth
    assert fsc_curve(rec.half1, gt)[1][8:].mean() < fsc_gt[8:].mean()
    # Wiener-filtered by the half-set SNR, a half map is nearer the truth than the raw half map (the noise
    # beyond its resolution is damped), and still not as near as the full map
    def rel_error(v: np.ndarray) -> float:
        a = np.sum(v * gt) / np.sum(v * v)             # best amplitude: the filter also scales the map
        return float(np.linalg.norm(a * v - gt) / np.linalg.norm(gt))

    for raw, filtered in zip((rec.half1, rec.half2), rec.halves_wiener):
        assert rel_error(filtered) < 0.9 * rel_error(raw)
        assert rel_error(filtered) > rel_error(rec.map)


def test_chunking_batching_and_insertion_order_do_not_change_the_result():
    D, apix, n = 16, 3.0, 120
    _, images, A, origins, ctf = simulate(n, D, apix, snr=1.0, seed=4)
    halves = split_halves(np.arange(n), None, 0)
    ref = reconstruct(lambda pos: images[pos], n, D, apix, A, origins, ctf, halves, progress=False)
    small = reconstruct(lambda pos: images[pos], n, D, apix, A, origins, ctf, halves, chunk=7,
                        progress=False)
    np.testing.assert_allclose(small.map, ref.map, atol=1e-5 * np.abs(ref.map).max())
    ins = FourierInserter(D, n_maps=1)
    perm = np.random.default_rng(0).permutation(n)
    for part in np.array_split(perm, 5):
        ins.insert(images[part], A[part], origins[part], ctf[part])
    ins2 = FourierInserter(D, n_maps=1)
    ins2.insert(images, A, origins, ctf)
    np.testing.assert_allclose(ins.grids(0)[0], ins2.grids(0)[0], atol=1e-9)


def test_inserter_puts_a_central_slice_where_A_transpose_says():
    """One image of a delta at the DC plus one Fourier component lands at Aᵀ·(kx, ky, 0), nearest voxel."""
    D = 16
    A = random_poses(1, np.random.default_rng(5))
    ins = FourierInserter(D, interpolation="nearest")
    img = np.zeros((1, D, D))
    img[0, D // 2, D // 2] = 1.0            # flat transform: every in-circle point gets 1
    ins.insert(img, A, None, None)
    num, w = ins.grids(0)
    k = np.array([3.0, -2.0, 0.0])          # a lattice point of the image, in voxels
    z = np.rint(A[0].T @ k).astype(int) + D // 2
    assert w[z[2], z[1], z[0]] >= 1
    assert num[z[2], z[1], z[0]].real == pytest.approx(w[z[2], z[1], z[0]])
    # nothing lands off the plane perpendicular to the viewing direction A[2] (more than half a voxel)
    normal = A[0][2]
    grid = np.stack(np.meshgrid(*[np.arange(D) - D // 2] * 3, indexing="ij"), -1)[..., ::-1]  # (z,y,x)→xyz
    off_plane = np.abs(grid @ normal) > 0.5 * np.sqrt(3) + 1e-9
    assert w[off_plane].sum() == 0


def test_half_split_is_seeded_balanced_and_follows_rlnRandomSubset():
    rows = np.arange(101)
    h = split_halves(rows, None, 7)
    np.testing.assert_array_equal(h, split_halves(rows, None, 7))
    assert not np.array_equal(h, split_halves(rows, None, 8))
    assert sorted(np.bincount(h).tolist()) == [50, 51]
    np.testing.assert_array_equal(split_halves(rows[:4], np.array([1, 2, 2, 1]), 0), [0, 1, 1, 0])


# ---- `drgn backproject` on a hand-built table --------------------------------------------------------------
def write_sim_table(folder: Path, n: int = 300, D: int = 24, apix: float = 2.5, snr: float = 2.0,
                    random_subset: bool = False) -> tuple[Path, np.ndarray]:
    """A canonical table + stack of analytic particles; returns (table path, ground-truth volume)."""
    gt, images, A, origins, ctf = simulate(n, D, apix, snr, seed=9)
    write_mrc(folder / "particles.mrcs", images, apix, stack=True)
    euler = matrix_to_euler(A)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
        "rlnAngleRot": euler[:, 0], "rlnAngleTilt": euler[:, 1], "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": origins[:, 0] * apix, "rlnOriginYAngst": origins[:, 1] * apix,
        "rlnDefocusU": ctf[:, 1], "rlnDefocusV": ctf[:, 2], "rlnDefocusAngle": ctf[:, 3],
        "rlnPhaseShift": ctf[:, 7], "rlnOpticsGroup": 1,
        "drgnStackPath": "particles.mrcs", "drgnStackIndex": np.arange(n), "drgnImageSign": 1,
        "drgnSourceRow": np.arange(n),
    })
    if random_subset:
        particles["rlnRandomSubset"] = 1 + (np.arange(n) % 2)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["og1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [D]})
    write_table(ParticleTable(particles, optics), folder / "table.star")
    return folder / "table.star", gt


def test_cli_subset_seed_and_lowpass(tmp_path, capsys):
    table_path, gt = write_sim_table(tmp_path)
    keep = np.arange(0, 300, 3)[::-1].copy()          # any order: rows are canonical, not positions
    np.save(tmp_path / "keep.npy", keep)
    out = tmp_path / "bp"
    rc = main(["backproject", str(table_path), "-o", str(out), "--ind", str(tmp_path / "keep.npy"),
               "--seed", "5", "--lowpass", "10"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "fsc.json").read_text())
    assert report["n_particles"] == 100 and report["split"] == "random (seed 5)"
    assert report["lowpass_A"] == 10.0
    # same selection through the API, without the low-pass, matches the half maps exactly
    rec = backproject_table(read_table(table_path), None, keep, seed=5, progress=False)
    h1, _ = read_mrc(out / "half1.mrc", mmap=False)
    np.testing.assert_allclose(h1, rec.half1, atol=1e-6 * np.abs(rec.half1).max())
    m, _ = read_mrc(out / "map.mrc", mmap=False)
    np.testing.assert_allclose(m, lowpass(rec.map, 2.5, 10.0), atol=1e-5 * np.abs(rec.map).max())
    assert corr(m, gt) > 0.8


def test_cli_uses_rlnRandomSubset_and_refuses_bad_input(tmp_path, capsys):
    table_path, _ = write_sim_table(tmp_path, n=40, D=16, random_subset=True)
    assert main(["backproject", str(table_path), "-o", str(tmp_path / "bp")]) == 0
    report = json.loads((tmp_path / "bp" / "fsc.json").read_text())
    assert report["split"] == "rlnRandomSubset" and report["n_half1"] == report["n_half2"] == 20

    np.save(tmp_path / "bad.npy", np.array([0, 40]))
    bad = tmp_path / "bad.npy"
    rc = main(["backproject", str(table_path), "-o", str(tmp_path / "bp2"), "--ind", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the progress bar of the first run
    assert rc == 2
    assert err == f"drgn backproject: error: {bad}: index 40 is out of range: the table has 40 rows (0 … 39)"
    assert not (tmp_path / "bp2").exists()

    shutil.copy(table_path, tmp_path / "copy.star")
    rc = main(["backproject", str(tmp_path / "copy.star"), "-o", str(tmp_path), "--lowpass", "-3"])
    assert rc == 2
    assert "--lowpass must be a positive resolution" in capsys.readouterr().err
    rc = main(["backproject", str(table_path), "-o", str(tmp_path / "bp3"), "--lowpass", "4"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == ("drgn backproject: error: --lowpass 4 Å is finer than Nyquist "
                                               "(5 Å at 2.5 Å/px)")
    assert not (tmp_path / "bp3").exists()
