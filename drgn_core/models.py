"""The cryoDRGN model: an image encoder and a coordinate-MLP decoder of the volume's Fourier transform.

Reference: Zhong, Bepler, Berger & Davis, "CryoDRGN: reconstruction of heterogeneous cryo-EM structures
using neural networks", Nature Methods 18, 176 (2021), Methods ("The cryoDRGN method", "Training system").

Conventions are drgnflow's (docs/architecture.md § Fourier transforms, § Poses): k in cycles/px of the
training box D, k = (i - D/2)/D; the image of pose A samples the volume transform at Aᵀ·(kx, ky, 0); volumes
are [z, y, x].

Pieces, in dependency order:
- `HalfLattice`: the transform pixels the model works on — inside the circle |k|·D < D/2 and on one half
  plane. A real image has F(-k) = conj F(k), so these P ≈ πD²/8 pixels carry all its information, and a
  squared error over them, counted twice off the DC term, equals the squared error over the full circle.
- `ResidMLP`: cryoDRGN's residual MLP (input layer, `layers` residual hidden layers, output layer).
- `FourierDecoder`: V(q, z) ∈ ℂ for 3D frequencies q. Positional encoding (random Gaussian Fourier features,
  or the paper's geometric sinusoids) → MLP → (Re, Im). Hermitian by construction: q is folded into one half
  space and the output conjugated for folded points, so the volume it represents is real.
- `HetVAE`: encoder (zdim > 0) + decoder; `slice` evaluates the decoder on an image's rotated half lattice.
- `vae_loss`: MSE over the circle + β·KL/N_pixels, exactly cryoDRGN's objective (see its docstring).
- `generate_volumes`: the decoder of a loaded model on a D³ grid → real-space density, de-normalised.
  Stages decode a run through `drgn_core.rundir.decode_volumes`, which loads (and caches) the model.
- `model_payload` / `load_model`: the model.pt dict (weights + config, plain tensors and values) that
  `drgn train` saves with `torch.save` and `load_model` reads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from drgn_core.errors import InputError

MODEL_FORMAT = "drgnflow-model/1"


# ---- the lattice --------------------------------------------------------------------------------------
class HalfLattice:
    """In-circle transform pixels of a D×D image on the half plane ky > 0 or (ky = 0, kx ≥ 0).

    Attributes (numpy, built once per D):
      flat     (P,)   indices into a centred D×D transform flattened in [y, x] order
      coords   (P, 2) (kx, ky) in cycles/px
      weights  (P,)   2 for a pixel standing for itself and its mirror -k, 1 for the DC term
      n_full          number of in-circle pixels of the full image (= weights.sum() = 2P - 1)
    """

    def __init__(self, D: int):
        if D % 2 or D < 4:
            raise ValueError(f"box size must be even and >= 4, got {D}")
        self.D = D
        i = np.arange(D) - D // 2  # integer frequency index; exact comparisons below
        iy, ix = np.meshgrid(i, i, indexing="ij")
        inside = ix**2 + iy**2 < (D // 2) ** 2
        half = (iy > 0) | ((iy == 0) & (ix >= 0))
        sel = inside & half
        self.flat = np.flatnonzero(sel)
        self.coords = np.stack([ix[sel], iy[sel]], axis=-1).astype(np.float64) / D
        dc = (ix[sel] == 0) & (iy[sel] == 0)
        self.weights = np.where(dc, 1.0, 2.0)
        self.n_full = int(self.weights.sum())

    @property
    def P(self) -> int:
        return len(self.flat)


def slice_coords(coords2d: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """3D frequencies of an image's pixels: q = Aᵀ·(kx, ky, 0) (docs/architecture.md § Poses).

    coords2d (P, 2), A (B, 3, 3) → q (B, P, 3), with q_j = Σ_i k_i A[i, j] = (k @ A[:2, :])_j.
    """
    return torch.matmul(coords2d, A[:, :2, :])


def hermitian_fold(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map q to the half space (z > 0, or z = 0 and y > 0, or z = y = 0 and x ≥ 0).

    Returns (q folded, flip) with flip True where q was negated; V(q) = conj V(-q) on those points. The
    lexicographic tie-break on the z = 0 plane keeps pairs (q, -q) on that plane consistent too, which
    matters for volume grids (the kz = 0 plane) and for poses with in-plane axes.
    """
    x, y, z = q[..., 0], q[..., 1], q[..., 2]
    flip = (z < 0) | ((z == 0) & ((y < 0) | ((y == 0) & (x < 0))))
    return torch.where(flip[..., None], -q, q), flip


# ---- building blocks ----------------------------------------------------------------------------------
class ResidMLP(nn.Module):
    """Linear(in→h) ReLU, then `layers` × [h + Linear(h→h)] ReLU, then Linear(h→out).

    The layout of cryoDRGN's ResidLinearMLP, so that "256×3" means the same network (and the same number
    of parameters) in both programs and throughput comparisons are like for like.
    """

    def __init__(self, in_dim: int, layers: int, hidden: int, out_dim: int):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, out_dim)

    def trunk(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden residual layers applied to an already activated first-layer output."""
        for lin in self.hidden:
            h = torch.relu(lin(h) + h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.trunk(torch.relu(self.inp(x))))


def make_pe_frequencies(D: int, pe_type: str, pe_dim: int, feat_sigma: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(3, F) matrix Ω such that the encoding of q (…, 3) is [sin(q Ω), cos(q Ω)].

    - 'gaussian': F = 3·pe_dim random vectors ω ~ N(0, σ²I)·D/2 (cryoDRGN's Gaussian features; with the
      default pe_dim = D/2 the network sees 3D features, as many as the geometric encoding).
    - 'geom': the paper's encoding, pe_dim sinusoids per axis with angular frequencies
      D·π·(2/D)^(i/(pe_dim-1)), i = 0..pe_dim-1: wavelengths from 2/D (Nyquist) to 1 on the domain
      (-1/2, 1/2). Block-diagonal Ω, so both encodings are one matmul.
    """
    if pe_type == "gaussian":
        w = torch.randn(3 * pe_dim, 3, generator=generator, dtype=torch.float64) * feat_sigma * (D // 2)
        return w.T.contiguous().float()
    if pe_type == "geom":
        i = torch.arange(pe_dim, dtype=torch.float64)
        f = D * math.pi * (2.0 / D) ** (i / max(pe_dim - 1, 1))
        omega = torch.zeros(3, 3 * pe_dim, dtype=torch.float64)
        for axis in range(3):
            omega[axis, axis * pe_dim:(axis + 1) * pe_dim] = f
        return omega.float()
    raise ValueError(f"unknown positional encoding {pe_type!r} (choose gaussian or geom)")


# ---- configuration ------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored in model.pt and config.yaml."""

    D: int                        # training box size (px); defines the lattice and k's units
    zdim: int = 10                # latent dimension (drgn train's default); 0 = homogeneous (decoder only)
    enc_dim: int = 256
    enc_layers: int = 3
    dec_dim: int = 256
    dec_layers: int = 3
    pe_type: str = "gaussian"     # 'gaussian' | 'geom'
    pe_dim: int = 0               # frequencies per axis; 0 → D // 2
    feat_sigma: float = 0.5       # σ of the Gaussian features
    enc_mask: int = 0             # encoder sees pixels with |k|·D < enc_mask; 0 → D // 2 (all)
    norm_scale: float = 1.0       # images' transforms are divided by this; volumes are multiplied back
    apix: float = 1.0             # pixel size (Å) of the training images, for writing volumes

    def __post_init__(self) -> None:
        if self.pe_dim <= 0:
            self.pe_dim = self.D // 2
        if self.enc_mask <= 0 or self.enc_mask > self.D // 2:
            self.enc_mask = self.D // 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---- the decoder --------------------------------------------------------------------------------------
class FourierDecoder(nn.Module):
    """V(q, z) for q (…, 3) in cycles/px of the training box: (…, 2) = (Re, Im) of the normalised transform.

    z enters the first layer as a per-image bias, W_pe·pe(q) + W_z·z, which is the same function as the
    usual concatenation [pe(q), z] but never materialises z repeated over every point (B·P × zdim).
    """

    def __init__(self, cfg: ModelConfig, generator: torch.Generator | None = None):
        super().__init__()
        omega = make_pe_frequencies(cfg.D, cfg.pe_type, cfg.pe_dim, cfg.feat_sigma, generator)
        self.register_buffer("omega", omega)  # (3, F), saved with the weights
        n_feat = 2 * omega.shape[1]
        self.mlp = ResidMLP(n_feat, cfg.dec_layers, cfg.dec_dim, 2)
        self.z_in = nn.Linear(cfg.zdim, cfg.dec_dim, bias=False) if cfg.zdim > 0 else None
        # initialise as one Linear(n_feat + zdim → h) would be (PyTorch's U(±1/√fan_in)), i.e. as cryoDRGN's
        # concatenated input: on its own, the z layer would start with weights √((n_feat + zdim)/zdim) times
        # larger and flood the untrained decoder with the prior's noise
        bound = 1.0 / math.sqrt(n_feat + cfg.zdim)
        first = [self.mlp.inp.weight, self.mlp.inp.bias]
        for p in first + ([self.z_in.weight] if self.z_in is not None else []):
            nn.init.uniform_(p, -bound, bound)

    def encode_positions(self, q: torch.Tensor) -> torch.Tensor:
        """(…, 3) → (…, 2F) sinusoids, in float32: bf16 cannot hold phases of tens of radians."""
        arg = torch.matmul(q.float(), self.omega)
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)

    def forward(self, q: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """q (B, N, 3), z (B, zdim) or None → (B, N, 2). Hermitian: V(-q) = conj V(q), V(0) real."""
        qf, flip = hermitian_fold(q)
        # fixed features; a gradient flows into the coordinates only where they carry one (the learned
        # pose corrections of drgn abinit's refinement), otherwise no graph is recorded for them at all
        pe = self.encode_positions(qf)                          # (B, N, 2F)
        h = self.mlp.inp(pe)                                    # (B, N, h)
        if self.z_in is not None:
            h = h + self.z_in(z)[:, None, :]                    # (B, 1, h) broadcast over points
        out = self.mlp.out(self.mlp.trunk(torch.relu(h))).float()  # (B, N, 2)
        # conjugate folded points; V(0) is its own mirror, so its imaginary part is 0 by symmetry
        sign = torch.where((q == 0).all(-1), 0.0, 1.0 - 2.0 * flip.to(out.dtype))
        return torch.stack([out[..., 0], out[..., 1] * sign], dim=-1)


# ---- the VAE ------------------------------------------------------------------------------------------
class HetVAE(nn.Module):
    """Encoder q(z | image) and decoder V(k, z). With zdim = 0 only the decoder exists (homogeneous)."""

    def __init__(self, cfg: ModelConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        lat = HalfLattice(cfg.D)
        self.lattice = lat
        self.register_buffer("coords2d", torch.from_numpy(lat.coords).float(), persistent=False)  # (P, 2)
        self.register_buffer("weights", torch.from_numpy(lat.weights).float(), persistent=False)  # (P,)
        # the encoder's pixels: all of the half lattice, or those inside a smaller circle (--enc-mask)
        enc = np.flatnonzero(np.linalg.norm(lat.coords, axis=-1) * cfg.D < cfg.enc_mask)
        self.register_buffer("enc_index", torch.from_numpy(enc), persistent=False)      # (P_enc,)
        self.encoder = (ResidMLP(2 * len(enc), cfg.enc_layers, cfg.enc_dim, 2 * cfg.zdim)  # in: (Re, Im)
                        if cfg.zdim > 0 else None)
        self.decoder = FourierDecoder(cfg, generator)
        self.trained_precision = "auto"  # set by load_model from model.pt: the arithmetic training used

    @property
    def zdim(self) -> int:
        return self.cfg.zdim

    def encode(self, y: torch.Tensor, ctf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y (B, P, 2) normalised centred transforms, ctf (B, P) → μ, log σ² (B, zdim).

        The encoder sees y·sign(CTF): phase-flipping removes the defocus-dependent sign pattern, so images of
        one structure at different defoci look alike to it (as in cryoDRGN).
        """
        assert self.encoder is not None, "homogeneous model (zdim = 0) has no encoder"
        if len(self.enc_index) < y.shape[1]:
            y, ctf = y[:, self.enc_index], ctf[:, self.enc_index]
        x = (y * torch.sign(ctf)[..., None]).reshape(y.shape[0], -1)  # (B, 2·P_enc)
        out = self.encoder(x).float()                                  # (B, 2·zdim)
        return out[:, : self.zdim], out[:, self.zdim:]

    def slice(self, A: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Decoded central slices on the half lattice: A (B, 3, 3), z (B, zdim) → (B, P, 2)."""
        return self.decoder(slice_coords(self.coords2d, A), z)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per image: -½ Σ_j (1 + log σ²_j - μ_j² - σ²_j) → (B,)."""
    return -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def image_mse(pred: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, n_full: int) -> torch.Tensor:
    """Mean squared error per image over the full in-circle lattice, from half-lattice values → (B,).

    pred, y (B, P, 2); weights (P,) = 2 off the DC term, or (B, P) when each image has its own pixels
    (drgn_core.pixel_select). For Hermitian pred and y this equals
    Σ_{|k|<1/2} |ΔF(k)|² / N_pixels, which is also the mean squared Hartley-space error cryoDRGN reports
    (Σ ΔH² = Σ |ΔF|² over ± pairs).
    """
    err = (pred - y).pow(2).sum(-1)  # (B, P)
    if weights.dim() == 2:
        return (err * weights).sum(-1) / n_full
    return torch.matmul(err, weights) / n_full


def vae_loss(mse: torch.Tensor, mu: torch.Tensor | None, logvar: torch.Tensor | None, beta: float,
             n_full: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch objective mean(MSE) + β·mean(KL)/N_pixels (the paper's ELBO with one Monte-Carlo sample).

    Dividing the KL by the number of pixels puts it on the per-pixel scale of the MSE, as cryoDRGN does.
    Returns (loss, mean KL) — the KL (0 for a homogeneous model) is logged separately.
    """
    if mu is None or logvar is None:
        kl = torch.zeros((), device=mse.device)
        return mse.mean(), kl
    kl = kl_divergence(mu, logvar).mean()
    return mse.mean() + beta * kl / n_full, kl


# ---- volumes ------------------------------------------------------------------------------------------
def _grid_half(D_out: int, D_train: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points of a D_out³ grid to evaluate: in the sphere both boxes resolve, on the half space.

    Returns (flat indices into the [z, y, x] grid, their mirror indices, q (n, 3) in cycles/px of the
    training box). Frequency index i - D_out/2 maps to k_train = (i - D_out/2)/D_train, so D_out < D_train
    is a Fourier crop and D_out > D_train a zero-padded (interpolated) volume.
    """
    c = D_out // 2
    i = np.arange(D_out) - c
    iz, iy, ix = i[:, None, None], i[None, :, None], i[None, None, :]  # broadcast: no D³ index arrays
    r_max = min(D_out, D_train) // 2
    inside = ix**2 + iy**2 + iz**2 < r_max**2
    half = (iz > 0) | ((iz == 0) & ((iy > 0) | ((iy == 0) & (ix >= 0))))
    flat = np.flatnonzero(inside & half)
    kz, ky, kx = (a - c for a in np.unravel_index(flat, (D_out, D_out, D_out)))
    mirror = np.ravel_multi_index((c - kz, c - ky, c - kx), (D_out, D_out, D_out))
    q = np.stack([kx, ky, kz], axis=-1).astype(np.float64) / D_train
    return flat, mirror, q


@torch.no_grad()
def generate_volumes(model: HetVAE, cfg: ModelConfig, z: np.ndarray | torch.Tensor | None,
                     D: int | None = None, batch: int = 65536) -> np.ndarray:
    """Density maps for latent points z (m, zdim) → float32 (m, D, D, D), [z, y, x], protein positive.

    The decoder is evaluated on the half of the grid's sphere (Hermitian symmetry fills the rest, so the
    inverse transform is real by construction), `batch` points per call. Values are multiplied by the
    model's normalisation scale and, for D ≠ cfg.D, by (D/cfg.D)³ so densities keep their meaning at any
    sampling (as `fourier.downsample_volume`). Images are bright protein and the CTF → +w at s = 0, so the
    learned density is positive where protein is. For zdim = 0, pass z=None (or an (m, 0) array).
    """
    D_out = int(D or cfg.D)
    if D_out % 2:
        raise InputError(f"volume box size must be even, got {D_out}")
    if cfg.zdim == 0:
        zs = torch.zeros(1 if z is None else max(len(z), 1), 0)
    else:
        if z is None:
            raise InputError(f"this model has zdim = {cfg.zdim}: give latent values")
        zs = torch.as_tensor(np.asarray(z, dtype=np.float32)).reshape(-1, cfg.zdim)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    flat, mirror, q = _grid_half(D_out, cfg.D)
    q_t = torch.from_numpy(q).float().to(dev)
    flat_t, mirror_t = torch.from_numpy(flat), torch.from_numpy(mirror)
    out = np.empty((len(zs), D_out, D_out, D_out), dtype=np.float32)
    rescale = cfg.norm_scale * (D_out / cfg.D) ** 3
    for m, zm in enumerate(zs):
        zb = zm[None].to(dev) if cfg.zdim > 0 else None
        vals = torch.empty(len(q), 2)
        for a in range(0, len(q), batch):
            vals[a:a + batch] = model.decoder(q_t[None, a:a + batch], zb)[0].float().cpu()
        F = torch.zeros(D_out**3, dtype=torch.complex128)
        v = torch.complex(vals[:, 0].double(), vals[:, 1].double())
        F[mirror_t] = v.conj()
        F[flat_t] = v  # the DC term is its own mirror: its value (imaginary part dropped below) wins
        F = F.reshape(D_out, D_out, D_out)
        vol = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(F))).real * rescale
        out[m] = vol.numpy().astype(np.float32)
    model.train(was_training)
    return out


# ---- saving and loading -------------------------------------------------------------------------------
def model_payload(model: HetVAE, cfg: ModelConfig, **extra) -> dict:
    """The model.pt dict: plain tensors and Python values only, so weights_only loading works."""
    from drgn_core import __version__

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format": MODEL_FORMAT, "model_config": cfg.to_dict(), "state_dict": state,
            "drgnflow_version": __version__, **extra}


def model_from_payload(payload: dict, source: str | os.PathLike, device: str | torch.device = "cpu"
                       ) -> tuple[HetVAE, ModelConfig]:
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise InputError(f"is not a drgnflow model file (expected format {MODEL_FORMAT})", source)
    cfg = ModelConfig.from_dict(payload["model_config"])
    model = HetVAE(cfg)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise InputError(f"weights do not match the stored model configuration ({e})", source) from None
    model.to(device).eval()
    model.trained_precision = str(payload.get("precision", "auto"))  # 'bf16' / 'fp32' from drgn train
    return model, cfg


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[HetVAE, ModelConfig]:
    """Load a trained model from a run directory (its model.pt) or model.pt → (model, cfg), eval mode."""
    path = Path(path)
    if path.is_dir():
        f = path / "model.pt"
        if not f.exists():
            hint = (" (training has not finished: continue it with drgn train ... --resume)"
                    if (path / "checkpoints").exists() else " (is it a drgn train run directory?)")
            raise InputError("has no model.pt" + hint, path)
        path = f
    if not path.exists():
        raise InputError("no such run directory or model file", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: name it and the reason
        raise InputError(f"cannot load as a model file ({type(e).__name__}: {e})", path) from None
    return model_from_payload(payload, path, device)
