"""Fewer decoder FLOPs per image (`drgn train --curriculum`, `--pixel-keep`; drgn_core.curriculum and
drgn_core.pixel_select): a step inside r = D/4 is the step on the D/2 Fourier-cropped stack; the restricted
phase evaluates the decoder at fewer points; a run resumes mid-curriculum bit for bit; the kept pixels are
the top-K by CTF²; with F = 1 the loss is the default loss."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_train import TINY_TRAIN, render

from drgn_core.cli import main
from drgn_core.curriculum import parse_curriculum, radius_at, resolve_curriculum
from drgn_core.data import ParticleData, open_particles
from drgn_core.downsample import downsample_table
from drgn_core.errors import DrgnError
from drgn_core.io.table import read_table
from drgn_core.models import FourierDecoder, HalfLattice, HetVAE, ModelConfig
from drgn_core.pixel_select import DecoderPixels
from drgn_core.train import batch_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [*TINY_TRAIN, "--val-frac", "0"]
SMALL_MODEL = {"zdim": 2, "enc_dim": 32, "enc_layers": 1, "dec_dim": 32, "dec_layers": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return render(tmp_path_factory.mktemp("curr"), n=96, D=16, kind="continuous", snr=1.0, apix=8.0, seed=3)


def _data(stack: Path, table, scale: float) -> ParticleData:
    src = open_particles(stack, table)
    return ParticleData(src, table, np.arange(len(table)), HalfLattice(src.D), scale, torch.device("cpu"),
                        "memory", progress=False)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 2e-5) -> None:
    scale = max(a.abs().max().item(), 1e-30)
    assert (a - b).abs().max().item() <= rtol * scale, ((a - b).abs().max().item(), scale)


def test_a_step_inside_quarter_radius_equals_the_step_on_the_half_size_crop(tiny, tmp_path):
    """One training step (loss, gradients, weights after Adam's step) at r = D/4 on the D = 16 images is
    the step of the same network on the stack `drgn downsample` crops to 8 px, whose normalisation scale is
    the full run's times (8/16)² (the crop keeps pixel values, so its transform is a quarter)."""
    table = read_table(tiny.table)
    crop = downsample_table(table, 8, tmp_path / "particles.8.mrcs", progress=False)
    assert crop.D == 8
    scale = 3.7
    full = HetVAE(ModelConfig(D=16, pe_dim=8, norm_scale=scale, **SMALL_MODEL),
                  generator=torch.Generator().manual_seed(0))
    small = HetVAE(ModelConfig(D=8, pe_dim=8, norm_scale=scale / 4, **SMALL_MODEL),
                   generator=torch.Generator().manual_seed(0))
    # the same random features: the crop's are in cycles/px of a box half as large
    assert torch.equal(small.decoder.omega, full.decoder.omega / 2)
    px = DecoderPixels(full, radius=4)
    inner = px.inner.numpy()
    np.testing.assert_array_equal(np.rint(full.lattice.coords[inner] * 16), np.rint(small.lattice.coords * 8))
    assert px.n_full == small.lattice.n_full and px.points == small.lattice.P

    # the crop's network is the full one: the same decoder, the encoder's input columns of the inner pixels
    small.decoder.mlp.load_state_dict(full.decoder.mlp.state_dict())
    small.decoder.z_in.load_state_dict(full.decoder.z_in.state_dict())
    small.encoder.load_state_dict({k: v for k, v in full.encoder.state_dict().items() if k != "inp.weight"},
                                  strict=False)
    cols = torch.from_numpy(np.stack([2 * inner, 2 * inner + 1], 1).ravel())
    with torch.no_grad():
        small.encoder.inp.weight.copy_(full.encoder.inp.weight[:, cols])

    d_full, d_small = _data(tiny.stack, table, scale), _data(crop.path, table, scale / 4)
    pos = np.arange(8, 24)
    b_full, b_small = next(d_full.batches(pos, 16)), next(d_small.batches(pos, 16))
    opt_f = torch.optim.Adam(full.parameters(), lr=1e-3)
    opt_s = torch.optim.Adam(small.parameters(), lr=1e-3)
    loss_f, mse_f, kl_f = batch_loss(full, b_full, 0.5, None, torch.Generator().manual_seed(1), px)
    loss_s, mse_s, kl_s = batch_loss(small, b_small, 0.5, None, torch.Generator().manual_seed(1))
    assert loss_f.item() == pytest.approx(loss_s.item(), rel=1e-5)
    assert mse_f.item() == pytest.approx(mse_s.item(), rel=1e-5) and kl_f.item() == pytest.approx(kl_s.item())
    loss_f.backward()
    loss_s.backward()

    g_enc = full.encoder.inp.weight.grad
    _close(g_enc[:, cols], small.encoder.inp.weight.grad)
    outside = torch.ones(g_enc.shape[1], dtype=torch.bool)
    outside[cols] = False
    assert torch.count_nonzero(g_enc[:, outside]) == 0  # the pixels outside r do not reach the encoder
    pairs = [(full.decoder.mlp, small.decoder.mlp), (full.decoder.z_in, small.decoder.z_in),
             (full.encoder.hidden, small.encoder.hidden), (full.encoder.out, small.encoder.out)]
    for a, b in pairs:
        for pa, pb in zip(a.parameters(), b.parameters()):
            _close(pa.grad, pb.grad)
    # Adam's first step moves each weight by about lr·sign(g): the two steps agree to 0.1 % of that (where
    # |g| is at rounding level the sign is moot, and so is the difference)
    before_f = [p.detach().clone() for p in full.parameters()]
    before_s = [p.detach().clone() for p in small.parameters()]
    opt_f.step()
    opt_s.step()
    step_f = {n: p.detach() - b for (n, p), b in zip(full.named_parameters(), before_f)}
    step_s = {n: p.detach() - b for (n, p), b in zip(small.named_parameters(), before_s)}
    assert step_f["decoder.mlp.inp.weight"].abs().max().item() == pytest.approx(1e-3, rel=1e-3)
    for name, st in step_s.items():
        mine = step_f[name][:, cols] if name == "encoder.inp.weight" else step_f[name]
        assert (mine - st).abs().max().item() <= 1e-6, name
    assert torch.count_nonzero(step_f["encoder.inp.weight"][:, outside]) == 0


def test_curriculum_run_evaluates_fewer_decoder_points_and_resumes_mid_curriculum(tiny, tmp_path,
                                                                                  monkeypatch):
    """A 3-epoch run with --curriculum 4:1,6:1: the decoder is evaluated at P(4) points per training image
    in epoch 1, P(6) in epoch 2 and all P in epoch 3 (counted at the decoder itself), train_log.csv and
    config.yaml record it, and a run interrupted inside the curriculum resumes to the same weights."""
    counts: list[int] = []
    forward = FourierDecoder.forward

    def counting(self, q, z=None):
        if self.training:  # training steps (the decoder is in eval mode only for maps, not used here)
            counts.append(q.shape[0] * q.shape[1])
        return forward(self, q, z)

    monkeypatch.setattr(FourierDecoder, "forward", counting)
    args = ["train", str(tiny.table), str(tiny.stack), "--epochs", "3", "--curriculum", "4:1,6:1", *TINY,
            "--encode-every", "1"]
    assert main([*args, "-o", str(tmp_path / "full")]) == 0
    run = tmp_path / "full"
    lat = HalfLattice(16)
    ij = np.rint(lat.coords * 16)
    P = [int(((ij**2).sum(-1) < r * r).sum()) for r in (4, 6)] + [lat.P]
    n = 96  # --val-frac 0: every image trains, none is evaluated for validation
    per_epoch = [sum(counts[i * 12:(i + 1) * 12]) for i in range(3)]  # 12 batches of 8 per epoch
    assert len(counts) == 36 and per_epoch == [n * p for p in P], (per_epoch, P)
    log = np.genfromtxt(run / "train_log.csv", delimiter=",", names=True)
    assert list(log["radius"]) == [4, 6, 8] and list(log["decoder_points"]) == P
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["training"]["curriculum"] == "4:1,6:1" and cfg["training"]["pixel_keep"] == 1.0
    # epoch 1's snapshot encodes what epoch 1's encoder saw: the pixels inside radius 4
    from drgn_core.models import load_model

    m1, cfg1 = load_model(run / "checkpoints" / "model.001.pt")
    table = read_table(tiny.table)
    batch = next(_data(tiny.stack, table, cfg1.norm_scale).batches(np.arange(16), 16))
    with torch.no_grad():
        mu_in, _ = m1.encode(DecoderPixels(m1, 4).encoder_input(batch.y), batch.ctf)
        mu_all, _ = m1.encode(batch.y, batch.ctf)
    z1 = np.load(run / "checkpoints" / "z.001.npy")[:16]
    np.testing.assert_allclose(z1, mu_in.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(z1, mu_all.numpy(), rtol=1e-3)

    # interrupted in the first phase (after a mid-epoch checkpoint), then resumed: the same weights
    import drgn_core.train as train_mod

    class Killed(RuntimeError):
        pass

    save = train_mod.save_checkpoint

    def save_then_die(path, model, opt, gen, state, *rest):
        save(path, model, opt, gen, state, *rest)
        if state.epoch == 0 and state.step >= 5:
            raise Killed

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    cut = [*args, "-o", str(tmp_path / "cut"), "--checkpoint-minutes", "1e-9"]
    with pytest.raises(Killed):
        main(cut)
    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 0
    assert main([*cut, "--resume"]) == 0
    a = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _ctf_batch(n: int = 4, P: int = 50, seed: int = 0):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(y=torch.randn(n, P, 2, generator=g), ctf=torch.randn(n, P, generator=g))


def test_pixel_keep_takes_the_top_k_by_ctf_squared_and_keep_one_is_the_default_loss(tiny):
    """The kept pixels are, image by image, the K = round(F·P) with the largest CTF² (checked against a
    sort of a known CTF), each image costs K decoder evaluations, and F = 1 gives the default loss."""
    table = read_table(tiny.table)
    model = HetVAE(ModelConfig(D=16, **SMALL_MODEL), generator=torch.Generator().manual_seed(0))
    data = _data(tiny.stack, table, 2.0)
    batch = next(data.batches(np.arange(16), 16))
    P = model.lattice.P
    px = DecoderPixels(model, radius=8, keep=0.7)
    assert px.points == round(0.7 * P)
    seen = {}
    forward = model.decoder.forward

    def spy(q, z=None):
        seen["q"] = q
        return forward(q, z)

    model.decoder.forward = spy
    pred, y, w = px.predict(model, batch, batch.A.new_zeros(16, 2))
    q = seen["q"]
    assert q.shape == (16, px.points, 3) and pred.shape == y.shape == (16, px.points, 2)
    # which lattice pixels were kept: match each evaluated (rotated) point back to its 2D coordinate
    c2 = torch.einsum("bpj,bij->bpi", q, batch.A)[..., :2]  # A orthogonal: Aᵀk rotated back is k
    ctf2 = batch.ctf.pow(2).numpy()
    for i in range(16):
        d = torch.cdist(c2[i].double(), model.coords2d.double())
        kept = set(d.argmin(1).tolist())
        top = set(np.argsort(-ctf2[i], kind="stable")[:px.points].tolist())
        assert kept == top
        np.testing.assert_array_equal(y[i].numpy(), batch.y[i, d.argmin(1)].numpy())
        np.testing.assert_array_equal(w[i].numpy(), model.weights[d.argmin(1)].numpy())
    del model.decoder.forward

    # F = 1 inside the full radius: the default path's loss and gradients
    g = torch.Generator().manual_seed(5)
    loss_a, _, _ = batch_loss(model, batch, 0.5, None, g)
    loss_a.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_b, _, _ = batch_loss(model, batch, 0.5, None, torch.Generator().manual_seed(5),
                                  DecoderPixels(model, radius=8, keep=1.0))
    loss_b.backward()
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)
    for ga, p in zip(grads, model.parameters()):
        _close(ga, p.grad, 1e-5)


def test_pixel_by_snr_ranks_by_ctf_squared_times_the_spectral_snr(tiny):
    """--pixel-by snr: the kept pixels are the top-K by CTF²·SNR(r) for a given spectrum, and the spectrum
    measured on the hinge images is high at low radii, where the amplitude contrast leaves CTF² small."""
    from drgn_core.pixel_select import snr_by_radius

    table = read_table(tiny.table)
    model = HetVAE(ModelConfig(D=16, **SMALL_MODEL), generator=torch.Generator().manual_seed(0))
    data = _data(tiny.stack, table, 2.0)
    measured = snr_by_radius(data, np.arange(96))
    assert measured.shape == (9,) and (measured >= 0).all()
    assert measured[:3].min() > 10 * max(measured[-2:].max(), 0.1), measured
    batch = next(data.batches(np.arange(16), 16))
    snr = np.array([1e3, 3e2, 1e2, 10, 1, 0.1, 0, 0, 0])
    px = DecoderPixels(model, radius=8, keep=0.5, snr=snr)
    r = np.rint(np.linalg.norm(model.lattice.coords * 16, axis=1)).astype(int)
    score = batch.ctf.double().pow(2).numpy() * (snr[r] + 1e-6)
    idx = px.chosen(batch.ctf).numpy()
    for i in range(16):
        assert set(idx[i]) == set(np.argsort(-score[i], kind="stable")[:px.points])
        assert {0, 1, 2} <= set(idx[i])  # the DC term and the first ring: CTF² ~ 0.01, kept for their SNR
    top_ctf = torch.topk(batch.ctf.pow(2), px.points, dim=1).indices.numpy()
    assert not any(0 in set(t) for t in top_ctf)  # by CTF² alone, the DC term is never kept


def test_pixel_keep_normalises_by_the_whole_image(tiny):
    """The kept errors are divided by the whole image's in-circle pixel count: with K = P - 1, only the
    pixel of smallest CTF² is missing from the default MSE."""
    table = read_table(tiny.table)
    model = HetVAE(ModelConfig(D=16, **SMALL_MODEL), generator=torch.Generator().manual_seed(0))
    batch = next(_data(tiny.stack, table, 2.0).batches(np.arange(4), 4))
    P = model.lattice.P
    px = DecoderPixels(model, radius=8, keep=(P - 1) / P)
    assert px.points == P - 1
    from drgn_core.models import image_mse

    with torch.no_grad():
        z = torch.zeros(4, 2)
        pred_all = model.slice(batch.A, z) * batch.ctf[..., None]
        err = (pred_all - batch.y).pow(2).sum(-1) * model.weights       # (B, P)
        drop = batch.ctf.pow(2).argmin(1)
        want = (err.sum(1) - err[torch.arange(4), drop]) / model.lattice.n_full
        pred, y, w = px.predict(model, batch, z)
        got = image_mse(pred, y, w, px.n_full)
    _close(got, want, 1e-5)


def test_curriculum_schedule_and_its_errors(tiny, tmp_path, capsys):
    assert parse_curriculum("8:3, 0.25:2") == [(8, 3), (0.25, 2)]
    phases = resolve_curriculum("8:3,0.375:2", 64, 10)
    assert phases == [(8, 3), (24, 2)]
    assert [radius_at(phases, 64, e) for e in range(7)] == [8, 8, 8, 24, 24, 32, 32]
    for spec, msg in [("8", "is not RADIUS:EPOCHS"), ("8:0", "at least 1 epoch"), ("0.7:2", "(0, 0.5)"),
                      ("0:2", ">= 1 px")]:
        with pytest.raises(DrgnError, match=msg):
            parse_curriculum(spec)
    with pytest.raises(DrgnError, match="exceeds the images' Nyquist radius D/2 = 32"):
        resolve_curriculum("40:1", 64, 10)
    with pytest.raises(DrgnError, match="the radius may only grow"):
        resolve_curriculum("16:1,8:1", 64, 10)
    with pytest.raises(DrgnError, match="leaving no epoch over the full circle"):
        resolve_curriculum("16:5,24:5", 64, 10)
    base = ["train", str(tiny.table), str(tiny.stack), "-o", str(tmp_path / "r"), *TINY]
    assert main([*base, "--epochs", "2", "--curriculum", "4:2"]) == 2
    assert "leaving no epoch over the full circle" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main([*base, "--pixel-keep", "1.5"]) == 2
    assert "--pixel-keep must be in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*base, "--curriculum", "eight:2"])
    assert e.value.code == 2 and "is not RADIUS:EPOCHS" in capsys.readouterr().err
