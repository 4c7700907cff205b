"""The model's pieces against exact expectations: lattice bookkeeping, Hermitian symmetry, the loss and KL
formulas, the geometry of slices and volumes, resampling, saving/loading, and the data path's conventions
against the independent fixture (tests/data/conventions)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_train import complex_corr, make_object, sample_ft

from drgn_core.ctf import ctf_from_params
from drgn_core.data import Preparer
from drgn_core.fourier import circular_mask, fft2_center, fft3_center, ifft3_center
from drgn_core.models import (
    HalfLattice,
    HetVAE,
    ModelConfig,
    generate_volumes,
    hermitian_fold,
    image_mse,
    kl_divergence,
    load_model,
    model_payload,
    slice_coords,
    vae_loss,
)
from drgn_core.pose import random_poses

FIXTURE = Path(__file__).resolve().parent / "data" / "conventions"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_model(D: int = 16, zdim: int = 2, seed: int = 0, **kw) -> HetVAE:
    torch.manual_seed(seed)
    cfg = ModelConfig(D=D, zdim=zdim, enc_dim=32, enc_layers=1, dec_dim=32, dec_layers=1, **kw)
    return HetVAE(cfg, generator=torch.Generator().manual_seed(seed)).eval()


# ---- lattice ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [8, 16, 33 - 1])
def test_half_lattice_covers_the_circle_once(D):
    lat = HalfLattice(D)
    inside = circular_mask(D)
    full = {tuple(k) for k in np.round(lat.coords * D).astype(int)}
    mirrors = {(-a, -b) for a, b in full}
    assert full & mirrors == {(0, 0)}                      # only DC is its own mirror
    circle = {(j - D // 2, i - D // 2) for i, j in zip(*np.nonzero(inside))}
    assert full | mirrors == circle                        # half + mirrors = the whole circle
    assert lat.n_full == inside.sum() == 2 * lat.P - 1
    # flat indices address the same pixels as the coordinates
    iy, ix = np.unravel_index(lat.flat, (D, D))
    assert np.array_equal(np.stack([ix - D // 2, iy - D // 2], -1), np.round(lat.coords * D).astype(int))


def test_half_lattice_mse_equals_full_circle_and_hartley_mse():
    """Σ over half the circle (weights 2, DC 1) of |ΔF|² = Σ over the circle of |ΔF|² = Σ ΔH² (cryoDRGN)."""
    rng = np.random.default_rng(0)
    D = 24
    a, b = rng.normal(size=(2, 3, D, D))
    Fa, Fb = fft2_center(a), fft2_center(b)
    inside = circular_mask(D)
    full = (np.abs(Fa - Fb) ** 2)[:, inside].sum(-1) / inside.sum()
    # the Hartley transform H = Re F - Im F, which cryoDRGN trains on
    Ha, Hb = Fa.real - Fa.imag, Fb.real - Fb.imag
    hartley = ((Ha - Hb) ** 2)[:, inside].sum(-1) / inside.sum()
    lat = HalfLattice(D)
    prep = Preparer(lat)
    ya, yb = prep(a, np.zeros((3, 2))), prep(b, np.zeros((3, 2)))
    half = image_mse(ya, yb, torch.from_numpy(lat.weights).float(), lat.n_full).numpy()
    np.testing.assert_allclose(half, full, rtol=1e-5)
    np.testing.assert_allclose(hartley, full, rtol=1e-10)


# ---- symmetry and shapes ------------------------------------------------------------------------------
def test_decoder_is_hermitian_including_ties_on_the_z0_plane():
    m = small_model()
    rng = np.random.default_rng(1)
    q = rng.uniform(-0.5, 0.5, size=(1, 200, 3))
    q[0, :40, 2] = 0.0                         # points on the kz = 0 plane
    q[0, 40:60, 1:] = 0.0                      # and on the kx axis
    q = torch.from_numpy(q).float()
    z = torch.randn(1, 2)
    with torch.no_grad():
        v, vm = m.decoder(q, z), m.decoder(-q, z)
    torch.testing.assert_close(vm[..., 0], v[..., 0])
    torch.testing.assert_close(vm[..., 1], -v[..., 1])
    qf, flip = hermitian_fold(q)
    assert (qf[..., 2] >= 0).all() and flip[0, :40].any() and not flip[0, 40:60][q[0, 40:60, 0] > 0].any()


def test_shapes_and_homogeneous_model():
    m = small_model(D=16, zdim=3)
    B, P = 5, m.lattice.P
    y, ctf = torch.randn(B, P, 2), torch.randn(B, P)
    A = torch.from_numpy(random_poses(B, np.random.default_rng(0))).float()
    mu, lv = m.encode(y, ctf)
    assert mu.shape == lv.shape == (B, 3)
    assert m.encoder.inp.in_features == 2 * P
    assert m.slice(A, mu).shape == (B, P, 2)
    h = small_model(D=16, zdim=0)
    assert h.encoder is None and h.decoder.z_in is None
    assert h.slice(A, None).shape == (B, P, 2)


def test_slice_coords_rotate_the_lattice_by_A_transposed():
    A = torch.from_numpy(random_poses(4, np.random.default_rng(2))).float()
    k = torch.randn(7, 2)
    q = slice_coords(k, A)
    k3 = torch.cat([k, torch.zeros(7, 1)], -1)
    expect = torch.einsum("bji,pj->bpi", A, k3)        # Aᵀ·(kx, ky, 0)
    torch.testing.assert_close(q, expect)


def test_geom_encoding_spans_nyquist_to_box():
    m = small_model(D=32, zdim=0, pe_type="geom")
    om = m.decoder.omega                                 # (3, 3·16) block diagonal
    f = om[0, :16]
    np.testing.assert_allclose([f[0].item(), f[-1].item()], [32 * np.pi, 2 * np.pi], rtol=1e-6)
    assert (om[1, :16] == 0).all() and (om[0, 16:] == 0).all()


# ---- loss ---------------------------------------------------------------------------------------------
def test_kl_formula_matches_torch_distributions():
    mu, lv = torch.randn(6, 4), torch.randn(6, 4)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * lv))
    p = torch.distributions.Normal(torch.zeros(6, 4), torch.ones(6, 4))
    torch.testing.assert_close(kl_divergence(mu, lv), torch.distributions.kl_divergence(q, p).sum(-1))
    assert kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0


def test_vae_loss_is_mse_plus_beta_kl_per_pixel():
    mse = torch.tensor([1.0, 3.0])
    mu, lv = torch.ones(2, 2), torch.zeros(2, 2)        # KL = ½·Σ μ² = 1 per image
    loss, kl = vae_loss(mse, mu, lv, beta=0.5, n_full=100)
    assert kl.item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(2.0 + 0.5 * 1.0 / 100)
    loss0, kl0 = vae_loss(mse, None, None, beta=0.5, n_full=100)
    assert loss0.item() == 2.0 and kl0.item() == 0.0


# ---- volumes ------------------------------------------------------------------------------------------
def test_generated_volume_is_real_and_its_transform_is_the_decoder():
    """fft(volume) / scale equals the decoder on the grid inside the sphere and 0 outside: nothing was
    lost when the imaginary part was dropped, i.e. the volume is real by construction."""
    D = 16
    m = small_model(D=D, zdim=2, seed=3)
    m.cfg.norm_scale = 2.5
    z = np.array([[0.3, -0.7]], dtype=np.float32)
    vol = generate_volumes(m, m.cfg, z)[0].astype(np.float64)
    F = fft3_center(vol) / 2.5
    k = (np.stack(np.meshgrid(*(np.arange(D) - D // 2,) * 3, indexing="ij"), -1)[..., ::-1]) / D  # (x,y,z)
    inside = (np.linalg.norm(k, axis=-1) * D) < D / 2
    with torch.no_grad():
        v = m.decoder(torch.from_numpy(k[inside][None]).float(), torch.from_numpy(z))[0].double().numpy()
    np.testing.assert_allclose(F[inside].real, v[:, 0], atol=2e-5 * np.abs(v).max())
    np.testing.assert_allclose(F[inside].imag, v[:, 1], atol=2e-5 * np.abs(v).max())
    assert np.abs(F[~inside]).max() < 1e-4 * np.abs(v).max()


def test_slice_of_decoded_volume_matches_decoder_on_rotated_lattice():
    """The transform of the generated volume, sampled at Aᵀk, equals the model's own slice for pose A."""
    D = 32
    m = small_model(D=D, zdim=1, seed=4)
    z = torch.tensor([[0.5]])
    F = fft3_center(generate_volumes(m, m.cfg, z.numpy())[0].astype(np.float64))
    A = random_poses(3, np.random.default_rng(5))
    k = m.lattice.coords
    inner = np.linalg.norm(k, axis=-1) < 0.4   # away from the sphere's edge, where interpolation sees zeros
    q = np.einsum("pi,nij->npj", np.concatenate([k, np.zeros((len(k), 1))], 1), A)
    sampled = sample_ft(F, q)[:, inner]
    with torch.no_grad():
        s = m.slice(torch.from_numpy(A).float(), z.expand(3, 1))[..., inner, :].double().numpy()
    s = s[..., 0] + 1j * s[..., 1]
    for a, b in zip(sampled, s):
        assert complex_corr(a, b) > 0.98
    # the transposed pose gives something else: the test can tell the two conventions apart
    qT = np.einsum("pi,nji->npj", np.concatenate([k, np.zeros((len(k), 1))], 1), A)
    assert complex_corr(sample_ft(F, qT)[0, inner], s[0]) < 0.9


def test_generate_smaller_box_is_a_fourier_crop():
    D, d = 16, 10
    m = small_model(D=D, zdim=1, seed=6)
    z = np.array([[0.2]], dtype=np.float32)
    big = generate_volumes(m, m.cfg, z)[0].astype(np.float64)
    small = generate_volumes(m, m.cfg, z, D=d)[0]
    F = fft3_center(big)
    a = D // 2 - d // 2
    Fc = F[a:a + d, a:a + d, a:a + d]
    i = np.arange(d) - d // 2
    r2 = i[:, None, None] ** 2 + i[None, :, None] ** 2 + i[None, None, :] ** 2
    Fc = np.where(r2 < (d // 2) ** 2, Fc, 0)
    expect = ifft3_center(Fc).real * (d / D) ** 3
    np.testing.assert_allclose(small, expect, atol=1e-5 * np.abs(expect).max())


def test_fitted_decoder_gives_positive_density_of_the_right_size():
    """Fit a homogeneous decoder directly to a positive blob object's transform; the generated volume must
    be that object (correlation, integral), in the right hand."""
    D = 16
    rng = np.random.default_rng(7)
    obj = make_object(rng, 8, 2.5, width=(1.2, 1.8))  # chiral enough that its mirror image differs
    truth = obj.volume(D).astype(np.float64)
    i = np.arange(D) - D // 2
    kk = np.stack(np.meshgrid(i, i, i, indexing="ij"), -1)[..., ::-1].reshape(-1, 3) / D
    kk = kk[np.linalg.norm(kk, axis=-1) < 0.5]
    kk = kk[~hermitian_fold(torch.from_numpy(kk))[1].numpy()]  # one of each ± pair: the decoder mirrors
    scale = 50.0
    target = torch.from_numpy(np.stack([obj.ft(kk).real, obj.ft(kk).imag], -1) / scale).float()[None]
    torch.manual_seed(0)
    cfg = ModelConfig(D=D, zdim=0, dec_dim=32, dec_layers=2, norm_scale=scale)
    m = HetVAE(cfg, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    q = torch.from_numpy(kk).float()[None]
    for _ in range(300):
        loss = (m.decoder(q, None) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vol = generate_volumes(m, cfg, None)[0]
    assert np.corrcoef(vol.ravel(), truth.ravel())[0, 1] > 0.99
    assert np.corrcoef(vol[::-1].ravel(), truth.ravel())[0, 1] < 0.9
    assert vol.sum() == pytest.approx(truth.sum(), rel=0.03)
    assert vol.max() == pytest.approx(truth.max(), rel=0.1) and vol.max() > 0


# ---- saving -------------------------------------------------------------------------------------------
def test_model_file_loads_with_weights_only(tmp_path):
    m = small_model(D=16, zdim=2, seed=8)
    m.cfg.norm_scale, m.cfg.apix = 3.5, 4.25
    f = tmp_path / "model.pt"
    torch.save(model_payload(m, m.cfg, epochs=3), f)
    raw = torch.load(f, weights_only=True)
    assert raw["model_config"]["norm_scale"] == 3.5 and raw["epochs"] == 3
    m2, cfg2 = load_model(f)
    assert cfg2 == m.cfg
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    A = torch.from_numpy(random_poses(2, np.random.default_rng(0))).float()
    z = torch.randn(2, 2)
    with torch.no_grad():
        assert torch.equal(m.slice(A, z), m2.slice(A, z))


def test_load_model_errors_name_the_file(tmp_path):
    from drgn_core.errors import InputError

    with pytest.raises(InputError, match=r"has no model\.pt"):
        load_model(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(InputError, match="training has not finished"):
        load_model(tmp_path)
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match=r"model.pt: cannot load as a model file"):
        load_model(bad)


# ---- the data path against the conventions fixture ----------------------------------------------------
def test_prepared_fixture_images_are_centred_slices_times_ctf():
    """clean.mrcs (shifted projection × CTF, made by independent code) after our preparation — half
    lattice, shift undone with the table's origin — equals the volume's transform at Aᵀk times our CTF."""
    from drgn_core.io.mrc import read_mrc

    t = np.load(FIXTURE / "truth.npz")
    clean, _ = read_mrc(FIXTURE / "clean.mrcs", mmap=False)
    vol, _ = read_mrc(FIXTURE / "volume.mrc", mmap=False)
    D, apix = clean.shape[-1], float(t["apix"])
    rows = np.arange(0, 400, 23)
    lat = HalfLattice(D)
    y = Preparer(lat)(clean[rows], t["origin_A"][rows] / apix).double().numpy()
    y = y[..., 0] + 1j * y[..., 1]
    pad = np.zeros((2 * D,) * 3)
    pad[D // 2:D // 2 + D, D // 2:D // 2 + D, D // 2:D // 2 + D] = vol
    F = fft3_center(pad)
    k3 = np.concatenate([lat.coords, np.zeros((lat.P, 1))], 1)
    q = np.einsum("pi,nij->npj", k3, t["A"][rows])
    params = np.stack([np.full(len(rows), apix), t["defocus_u"][rows], t["defocus_v"][rows],
                       t["defocus_angle_deg"][rows], t["voltage_kv"][rows], t["cs_mm"][rows],
                       t["amp_contrast"][rows], t["phase_shift_deg"][rows], np.zeros(len(rows))], 1)
    expect = sample_ft(F, q) * ctf_from_params(lat.coords, params)
    corrs = [complex_corr(a, b) for a, b in zip(y, expect)]
    assert min(corrs) > 0.99, corrs
    # with the shift applied the wrong way round, agreement collapses
    y_wrong = Preparer(lat)(clean[rows], -t["origin_A"][rows] / apix).double().numpy()
    y_wrong = y_wrong[..., 0] + 1j * y_wrong[..., 1]
    moved = np.abs(t["origin_A"][rows]).max(1) > 3 * apix
    assert max(complex_corr(a, b) for a, b in zip(y_wrong[moved], expect[moved])) < 0.9
