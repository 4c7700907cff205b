"""The simulator: contract files, ground truth, SNR, junk, distributions, determinism, phantoms, errors."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from drgn_core.cli import main
from drgn_core.errors import DrgnError, InputError
from drgn_core.io.mrc import read_mrc, read_stack_header
from drgn_core.io.table import GT_COLUMNS, read_table
from drgn_core.phantoms import (
    AtomicModel,
    compositional_phantom,
    gaussian_sigma,
    hinge_from_model,
    hinge_phantom,
    load_atomic_model,
    render_density,
)
from drgn_core.projection import render_images
from drgn_core.simulate import GMM_MEANS_C, SimConfig, run_simulation, sample_coordinates

# Small but complete: 32 px at 6 Å/px is a 192 Å box (the paper's continuous sets used 6 Å/px).
SMALL = dict(D=32, apix=6.0)


@pytest.fixture(scope="module")
def continuous_run(tmp_path_factory) -> Path:
    """One end-to-end `drgn simulate` run through the CLI, shared by the contract tests."""
    out = tmp_path_factory.mktemp("sim") / "cont"
    rc = main(["simulate", "-o", str(out), "--n", "240", "-D", "32", "--apix", "6", "--snr", "0.1",
               "--heterogeneity", "continuous", "--distribution", "cooperative", "--junk-fraction", "0.25",
               "--seed", "11", "--quiet"])
    assert rc == 0
    return out


def test_cli_writes_every_contract_file(continuous_run):
    out = continuous_run
    for name in ["table.star", "particles.mrcs", "particles.star", "particles.cs", "gt.json",
                 "gt_volumes/coords.txt"]:
        assert (out / name).is_file(), name
    vols = sorted(p.name for p in (out / "gt_volumes").glob("vol_*.mrc"))
    assert vols == [f"vol_{j:03d}.mrc" for j in range(50)]
    n, ny, nx, apix, mode = read_stack_header(out / "particles.mrcs")
    assert (n, ny, nx, apix, mode) == (240, 32, 32, 6.0, 2)
    v, vapix = read_mrc(out / "gt_volumes" / "vol_000.mrc", mmap=False)
    assert v.shape == (32, 32, 32) and vapix == 6.0 and v.min() >= 0 and v.sum() > 0  # positive density
    coords = np.loadtxt(out / "gt_volumes" / "coords.txt")
    np.testing.assert_allclose(coords, np.linspace(0, 1, 50), atol=1e-6)
    assert not list(out.parent.glob(".*.part"))  # nothing left from the atomic write


def test_table_columns_and_ground_truth(continuous_run):
    t = read_table(continuous_run / "table.star")
    p = t.particles
    assert t.has_ground_truth() and all(c in p for c in GT_COLUMNS)
    assert t.box == 32 and t.apix == 6.0 and len(t) == 240
    names = p["rlnImageName"]
    assert names.iloc[0] == "000001@particles.mrcs" and names.iloc[-1] == "000240@particles.mrcs"
    np.testing.assert_array_equal(t.stack_indices(), np.arange(240))
    np.testing.assert_array_equal(t.source_rows(), np.arange(240))
    np.testing.assert_array_equal(t.image_signs(), 1)
    assert set(p["drgnStackPath"]) == {"particles.mrcs"}
    assert Path(t.stack_paths()[0]) == (continuous_run / "particles.mrcs").resolve()
    junk = t.gt("drgnGtJunk") == 1
    assert junk.sum() == round(0.25 * 240)  # exact
    np.testing.assert_array_equal(t.gt("drgnGtState")[junk], -1)
    np.testing.assert_array_equal(t.gt("drgnGtVolume")[junk], -1)
    assert np.isnan(t.gt("drgnGtCoord")[junk]).all()
    c = t.gt("drgnGtCoord")[~junk]
    assert np.all((c >= 0) & (c <= 1))
    np.testing.assert_array_equal(t.gt("drgnGtVolume")[~junk], np.rint(c * 49).astype(int))
    assert set(np.unique(t.gt("drgnGtState")[~junk])) <= {0, 1, 2}  # the GMM component
    uids = t.uids()
    assert uids is not None and len(np.unique(uids)) == 240
    gt = json.loads((continuous_run / "gt.json").read_text())
    assert gt["n_junk"] == 60 and sum(gt["junk_counts"].values()) == 60
    assert set(gt["junk_counts"].values()) == {20}  # shared evenly among noise, decoy, ice
    kinds = p["drgnGtJunkKind"].to_numpy()
    assert {int(k): int((kinds == k).sum()) for k in (1, 2, 3)} == {1: 20, 2: 20, 3: 20}
    assert gt["config"]["seed"] == 11 and gt["snr"] == 0.1


def test_images_are_the_table_rendered_plus_noise_at_the_requested_snr(continuous_run):
    """Re-render the clean particles from the GT maps with the table's own poses, origins and CTF: the
    residual is white noise with the recorded σ, and var(clean)/var(noise) is the requested SNR."""
    t = read_table(continuous_run / "table.star")
    gt = json.loads((continuous_run / "gt.json").read_text())
    imgs, _ = read_mrc(continuous_run / "particles.mrcs", mmap=False)
    vol_idx = t.gt("drgnGtVolume")
    rows = np.flatnonzero(vol_idx >= 0)
    clean = np.zeros((len(rows), 32, 32))
    A, shifts, ctf = t.poses(), t.shifts_px(), t.ctf_params()
    assert np.all(ctf[:, 8] == 100.0)  # the B-factor envelope is part of the recorded CTF
    for j in np.unique(vol_idx[rows]):
        v, _ = read_mrc(continuous_run / "gt_volumes" / f"vol_{j:03d}.mrc", mmap=False)
        k = vol_idx[rows] == j
        clean[k] = render_images(v.astype(np.float64), A[rows[k]], shifts[rows[k]], ctf[rows[k]])
    noise = imgs[rows] - clean
    assert noise.std() == pytest.approx(gt["noise_sigma"], rel=0.02)
    assert abs(noise.mean()) < 0.05 * gt["noise_sigma"]
    assert clean.var() / noise.var() == pytest.approx(0.1, rel=0.05)
    assert gt["signal_var"] == pytest.approx(clean.var(), rel=1e-3)
    # white: the noise power spectrum is flat (low and high frequency halves agree)
    ps = np.abs(np.fft.fft2(noise)) ** 2
    f = np.fft.fftfreq(32)
    r = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    assert ps[:, r < 0.2].mean() == pytest.approx(ps[:, r > 0.3].mean(), rel=0.05)
    # pure-noise junk rows hold only noise of the same σ
    noise_rows = np.flatnonzero(t.particles["drgnGtJunkKind"].to_numpy() == 1)
    assert imgs[noise_rows].std() == pytest.approx(gt["noise_sigma"], rel=0.05)


def test_relion_and_cryosparc_files_describe_the_same_particles(continuous_run):
    import starfile
    from cryosparc.dataset import Dataset

    t = read_table(continuous_run / "table.star")
    star = starfile.read(continuous_run / "particles.star", always_dict=True)
    parts = star["particles"]
    assert len(parts) == 240 and parts["rlnImageName"].iloc[5] == "000006@particles.mrcs"
    np.testing.assert_allclose(parts["rlnAngleTilt"], t.particles["rlnAngleTilt"], atol=1e-5)
    np.testing.assert_allclose(parts["rlnOriginXAngst"], t.particles["rlnOriginXAngst"], atol=1e-5)
    assert float(star["optics"]["rlnImagePixelSize"].iloc[0]) == 6.0
    cs = Dataset.load(str(continuous_run / "particles.cs"))
    assert len(cs) == 240
    np.testing.assert_array_equal(cs["blob/idx"], np.arange(240))
    np.testing.assert_array_equal(cs["uid"], t.uids())


def test_cooperative_has_three_modes_noncontiguous_is_gapped_uniform_is_flat():
    rng = np.random.default_rng(0)
    m = 60000
    hist = {}
    for dist in ("uniform", "cooperative", "noncontiguous"):
        c, comp = sample_coordinates(SimConfig(distribution=dist), m, rng)
        assert c.min() >= 0 and c.max() <= 1
        hist[dist] = np.histogram(c, bins=49, range=(0, 1))[0]
        if dist != "uniform":
            # component k is centred at the 10th/25th/40th of 50 maps, σ = 0.09 or 0.03 rad of 1.5 rad
            for k, mu in enumerate(GMM_MEANS_C):
                assert np.median(c[comp == k]) == pytest.approx(mu, abs=0.005)
            sigma = {"cooperative": 0.09, "noncontiguous": 0.03}[dist] / 1.5
            assert np.std(c[comp == 1]) == pytest.approx(sigma, rel=0.05)
    h = hist["cooperative"]
    smooth = np.convolve(h, np.ones(3) / 3, mode="same")
    peaks = [i for i in range(1, 48) if smooth[i] > smooth[i - 1] and smooth[i] >= smooth[i + 1]
             and smooth[i] > 0.5 * smooth.max()]
    assert len(peaks) == 3 and [abs(p - q) <= 1 for p, q in zip(peaks, (9, 24, 39))] == [True] * 3
    # noncontiguous leaves the transitions (between the modes) all but empty; cooperative does not
    between = slice(15, 19)
    assert hist["noncontiguous"][between].sum() < 0.001 * m < 0.02 * m < h[between].sum()
    u = hist["uniform"]
    assert u.min() > 0.85 * m / 49 and u.max() < 1.15 * m / 49


def test_hinge_moves_only_one_domain_by_the_set_angle():
    model, hinge = hinge_phantom(1500, np.random.default_rng(3), angle_range=1.5)
    a, b = hinge.apply(model, 0.0), hinge.apply(model, 1.0)
    arm = model.domains == hinge.domain
    np.testing.assert_array_equal(a.coords[~arm], b.coords[~arm])
    np.testing.assert_array_equal(a.coords[~arm], model.coords[~arm])
    # the arm turned by 1.5 rad about the hinge axis: compare an atom's direction around the axis
    u = hinge.axis

    def around_axis(x: np.ndarray) -> np.ndarray:
        d = x - hinge.point
        return d - np.outer(d @ u, u)

    ra, rb = around_axis(a.coords[arm]), around_axis(b.coords[arm])
    cos = (ra * rb).sum(1) / (np.linalg.norm(ra, axis=1) * np.linalg.norm(rb, axis=1))
    np.testing.assert_allclose(np.arccos(np.clip(cos, -1, 1)), 1.5, atol=1e-6)
    # distances within the arm are kept (a rigid motion), and the arm really moves
    np.testing.assert_allclose(np.linalg.norm(a.coords[arm][1:] - a.coords[arm][0], axis=1),
                               np.linalg.norm(b.coords[arm][1:] - b.coords[arm][0], axis=1), atol=1e-9)
    assert np.linalg.norm(a.coords[arm] - b.coords[arm], axis=1).mean() > 20.0
    # in density: the two end maps differ only where the arm is
    D, apix, res = 48, 4.0, 8.0
    va, vb = render_density(a, D, apix, res), render_density(b, D, apix, res)
    arm_a = render_density(a.select(arm), D, apix, res)
    arm_b = render_density(b.select(arm), D, apix, res)
    far = (arm_a < 1e-4 * va.max()) & (arm_b < 1e-4 * va.max())
    assert np.abs(vb - va)[far].max() < 1e-4 * va.max()
    assert np.abs(vb - va).max() > 0.3 * va.max()


def test_continuous_maps_change_steadily_along_c(continuous_run):
    vols = [read_mrc(continuous_run / "gt_volumes" / f"vol_{j:03d}.mrc", mmap=False)[0].astype(np.float64)
            for j in (0, 8, 16, 24, 32, 40, 49)]
    dist = [np.linalg.norm(v - vols[0]) for v in vols]
    assert all(d2 > d1 for d1, d2 in itertools.pairwise(dist))  # farther along c, farther from map 0
    mass = [v.sum() for v in vols]
    np.testing.assert_allclose(mass, mass[0], rtol=1e-4)  # a hinge moves density, never adds it


def test_compositional_states_populations_and_determinism(tmp_path):
    import torch

    threads = torch.get_num_threads()
    cfg = SimConfig(n=300, heterogeneity="compositional", junk_fraction=0.1, seed=5, **SMALL)
    try:  # the caller's torch thread setting must not change the bytes (rendering runs on one thread)
        torch.set_num_threads(1)
        a = run_simulation(cfg, tmp_path / "a", progress=False)
        torch.set_num_threads(2)
        b = run_simulation(cfg, tmp_path / "b", progress=False)
        assert torch.get_num_threads() == 2  # and the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    for name in ["particles.mrcs", "table.star", "particles.star", "particles.cs", "gt.json",
                 "gt_volumes/vol_002.mrc", "gt_volumes/coords.txt"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a == b
    run_simulation(SimConfig(**{**cfg.__dict__, "seed": 6}), tmp_path / "c", progress=False)
    stack_a = (tmp_path / "a" / "particles.mrcs").read_bytes()
    assert stack_a != (tmp_path / "c" / "particles.mrcs").read_bytes()
    assert a["n_junk"] == 30
    # populations 0.2 / 0.3 / 0.5 of the 270 particles (binomial, 4σ)
    counts = np.array([a["state_counts"][str(s)] for s in range(3)])
    expected = 270 * np.array([0.2, 0.3, 0.5])
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected))
    # state k = core + subunits 1..k: each map adds density, never removes it
    vols = [read_mrc(tmp_path / "a" / "gt_volumes" / f"vol_{j:03d}.mrc", mmap=False)[0] for j in range(3)]
    assert np.all(vols[1] - vols[0] >= -1e-5) and np.all(vols[2] - vols[1] >= -1e-5)
    mass = np.array([v.sum() for v in vols])
    np.testing.assert_allclose(mass / mass[2], [0.5, 0.75, 1.0], atol=0.01)
    t = read_table(tmp_path / "a" / "table.star")
    good = t.gt("drgnGtJunk") == 0
    np.testing.assert_array_equal(t.gt("drgnGtVolume")[good], t.gt("drgnGtState")[good])
    assert np.isnan(t.gt("drgnGtCoord")).all()
    assert (tmp_path / "a" / "gt_volumes" / "coords.txt").read_text() == "0\n1\n2\n"


def test_homogeneous_dataset_and_auto_sized_model(tmp_path):
    # 32 px × 3 Å is too small for 3000 residues: the default model shrinks to fit (an explicit one errs)
    cfg = SimConfig(n=20, D=32, apix=3.0, heterogeneity="none", shift_max_px=2, write_clean=True)
    s = run_simulation(cfg, tmp_path / "h", progress=False)
    noisy, _ = read_mrc(tmp_path / "h" / "particles.mrcs", mmap=False)
    clean, _ = read_mrc(tmp_path / "h" / "clean.mrcs", mmap=False)
    assert (noisy - clean).std() == pytest.approx(s["noise_sigma"], rel=0.03)
    assert clean.var() == pytest.approx(s["signal_var"], rel=1e-4)
    assert 100 < s["model"]["n_atoms"] < 3000 and s["config"]["n_atoms"] == s["model"]["n_atoms"]
    t = read_table(tmp_path / "h" / "table.star")
    np.testing.assert_array_equal(t.gt("drgnGtState"), 0)
    np.testing.assert_array_equal(t.gt("drgnGtVolume"), 0)
    assert len(list((tmp_path / "h" / "gt_volumes").glob("vol_*.mrc"))) == 1
    with pytest.raises(DrgnError, match=r"--n-atoms \d+ or fewer"):
        run_simulation(SimConfig(n=5, D=32, apix=3.0, n_atoms=3000), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_render_density_matches_analytic_gaussians():
    assert gaussian_sigma(10.0) == pytest.approx(10.0 / (math.pi * math.sqrt(2)))  # molmap's σ factor
    pos = np.array([[3.3, -4.1, 2.2], [-9.0, 6.5, -3.7]])  # Å from the box centre
    model = AtomicModel(pos, np.array([2.0, 1.0]), np.zeros(2, dtype=np.int64), ("d",))
    D, apix = 48, 1.5  # wide enough to hold the 30 Å atoms' tails (4σ = 18 px)
    for res in (6.0, 30.0):  # narrow atoms (small cubes) and wide ones (separable product)
        vol = render_density(model, D, apix, res)
        assert vol.sum() == pytest.approx(3.0, rel=1e-4)  # mass kept (the box holds ±4σ)
        s = math.sqrt((gaussian_sigma(res) / apix) ** 2 + 1 / 12)  # a voxel average adds 1/12 px² variance
        g = np.arange(D) - D // 2
        z, y, x = np.meshgrid(g, g, g, indexing="ij")
        ref = sum(w * np.exp(-((x - p[0] / apix) ** 2 + (y - p[1] / apix) ** 2 + (z - p[2] / apix) ** 2)
                             / (2 * s * s)) / (2 * math.pi * s * s) ** 1.5 for p, w in zip(pos, (2.0, 1.0)))
        if res == 30.0:  # σ = 4.5 px: voxel integration ≈ sampling a Gaussian of variance σ² + 1/12
            np.testing.assert_allclose(vol, ref, atol=2e-3 * ref.max())
        # the density's centre of mass is the atoms' (in voxels [z, y, x] → Å)
        com = np.array([(vol * x).sum(), (vol * y).sum(), (vol * z).sum()]) / vol.sum() * apix
        np.testing.assert_allclose(com, (2 * pos[0] + pos[1]) / 3, atol=1e-3)


def test_hinge_for_an_arbitrary_model_moves_its_far_end():
    model, _ = hinge_phantom(2000, np.random.default_rng(4))
    relabelled, hinge = hinge_from_model(model, angle_range=1.0)
    moving = relabelled.domains == 1
    assert moving.mean() == pytest.approx(0.3, abs=0.01)
    moved = hinge.apply(relabelled, 1.0)
    np.testing.assert_array_equal(moved.coords[~moving], model.coords[~moving])
    assert np.linalg.norm(moved.coords[moving] - model.coords[moving], axis=1).mean() > 5.0


def test_procedural_models_are_compact_and_seeded():
    m1, _ = hinge_phantom(3000, np.random.default_rng(0))
    m2, _ = hinge_phantom(3000, np.random.default_rng(0))
    np.testing.assert_array_equal(m1.coords, m2.coords)
    steps = np.linalg.norm(np.diff(m1.coords[m1.domains == 0], axis=0), axis=1)
    assert steps.max() < 3.9  # a chain of 3.8 Å Cα steps (helices are tighter)
    np.testing.assert_allclose(m1.centre_of_mass(), 0, atol=1e-9)
    assert m1.max_radius() < 75  # 3,000 residues in about a 150 Å particle
    c = compositional_phantom(2000, 4, np.random.default_rng(1))
    assert c.n_domains == 4 and (c.domains == 0).sum() == 1000


PDB = """\
ATOM      1  N   ALA A   1       0.000   0.000   0.000  1.00  0.00           N
ATOM      2  CA  ALA A   1       1.458   0.000   0.000  1.00  0.00           C
ATOM      3  C   ALA A   1       2.009   1.420   0.000  0.50  0.00           C
ATOM      4  SG  CYS B   2       8.000   2.000   1.000  1.00  0.00           S
ATOM      5  O   GLY C   3      -6.000  -3.000   2.000  1.00  0.00           O
HETATM    6  O   HOH W   4      20.000  20.000  20.000  1.00  0.00           O
END
"""


def test_atomic_model_file_source(tmp_path):
    path = tmp_path / "tiny.pdb"
    path.write_text(PDB)
    m = load_atomic_model(path)
    assert m.domain_names == ("A", "B", "C")  # the water is dropped
    np.testing.assert_allclose(sorted(m.weights), sorted([7.0, 6.0, 3.0, 16.0, 8.0]))
    np.testing.assert_allclose(m.centre_of_mass(), 0, atol=1e-12)
    s = run_simulation(SimConfig(n=30, D=24, apix=2.0, heterogeneity="compositional", model_path=str(path),
                                 shift_max_px=1, seed=1), tmp_path / "sim", progress=False)
    assert s["model"]["source"] == str(path) and s["model"]["n_atoms"] == 5
    vol_dir = tmp_path / "sim" / "gt_volumes"
    mass = [read_mrc(vol_dir / f"vol_{j:03d}.mrc", mmap=False)[0].sum() for j in range(3)]
    np.testing.assert_allclose(mass, [16.0, 32.0, 40.0], rtol=1e-4)  # chain A (16), + B (S 16), + C (O 8)
    # continuous from a file: the outer part along the longest axis swings about a hinge
    s = run_simulation(SimConfig(n=10, D=24, apix=2.0, n_gt=4, model_path=str(path), shift_max_px=1),
                       tmp_path / "cont", progress=False)
    assert s["hinge"]["domain"] == 1 and s["model"]["domains"] == ["fixed", "moving"]
    v0, _ = read_mrc(tmp_path / "cont" / "gt_volumes" / "vol_000.mrc", mmap=False)
    v3, _ = read_mrc(tmp_path / "cont" / "gt_volumes" / "vol_003.mrc", mmap=False)
    assert v0.sum() == pytest.approx(v3.sum(), rel=1e-3) and np.abs(v0 - v3).max() > 0.1 * v0.max()
    with pytest.raises(InputError, match="cannot read as PDB/mmCIF"):
        load_atomic_model(tmp_path / "sim" / "gt.json")
    with pytest.raises(InputError, match="needs at least 4"):
        cfg = SimConfig(n=5, heterogeneity="compositional", n_states=4, model_path=str(path), **SMALL)
        run_simulation(cfg, tmp_path / "y", progress=False)


def test_user_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "bad"
    rc = main(["simulate", "-o", str(out), "-D", "33", "--snr", "0", "--junk-fraction", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert err.startswith("drgn simulate: error: 3 invalid simulation settings: -D must be an even box size")
    assert "--snr must be > 0 (got 0.0)" in err and "--junk-fraction must be in [0, 1) (got 1.0)" in err
    assert len(err.splitlines()) == 1
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    assert main(["simulate", "-o", str(busy), "--n", "5", "--quiet"]) == 2
    assert "is not an earlier drgn simulate output" in capsys.readouterr().err
    assert (busy / "mine.txt").read_text() == "keep me"
    assert main(["simulate", "-o", str(out), "--model", str(tmp_path / "none.pdb"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("none.pdb: no such file (expected an atomic model, .pdb or .cif)")
