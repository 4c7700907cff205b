"""Which pixels of each image the decoder is evaluated at in training: a Fourier radius, and the top CTF².

The decoder costs the same at every pixel, so fewer pixels per image is fewer FLOPs. Two levers of
`drgn train`, which may be combined (docs/architecture.md § Resolution curriculum; docs/usage.md, *Fewer
FLOPs*):

- a radius r (the curriculum, drgn_core.curriculum): only half-lattice pixels with |k|·D < r. This is
  *exactly* training on the images Fourier-cropped to a 2r box with the same normalisation scale times
  (2r/D)²: the same lattice points, the same values, and a loss normalised by the number of in-circle
  pixels of that crop (for the MSE and the KL term alike, as a run at that box would). The encoder sees
  only those pixels too (the others are zeroed, which is the cropped encoder with its other input
  columns untouched: their gradient is exactly zero, so Adam leaves them where they were).
- `keep` F < 1 (--pixel-keep): of those pixels, each image keeps its K = round(F·P) with the largest
  CTF² (--pixel-by ctf2). Under white noise the Fisher information of a pixel about the map is ∝ CTF²
  times the signal's power there, and CTF² alone is that only where the signal's spectrum is flat. It is
  not: measured on the CI-size hinge (D 32), the radii 0-2, where the signal is 15-30 times the noise
  floor, have CTF² < 0.07 (amplitude contrast only) and are never kept, while the outer shells, kept,
  carry almost no signal. --pixel-by snr ranks by the expected SNR of the pixel instead,
  CTF²·S(r)/N, with the signal spectrum S(r) = (P(r) − N)/⟨CTF²⟩(r) from the radial power P(r) of
  (up to 1,000) training images and the noise floor N, the median power of the outer fifth of the radii
  (`snr_by_radius`). K is fixed, so the shapes stay static. The kept squared errors are summed with
  their Hermitian weights and divided by the number of in-circle pixels of the whole image, not of the
  kept ones: the gradient is then the full loss's gradient less the terms of the dropped pixels, which
  carry the least information, and the balance between the data term and β·KL is that of the full loss.
  The selection is a deterministic function of the CTF (and the spectrum, measured once), so it is the
  same every epoch and for the validation loss. The encoder sees every pixel inside the radius: it is
  cheap, and it needs the low-CTF² pixels no less than before.

`DecoderPixels.points` is the number of decoder evaluations per image; train_log.csv records it.
"""

from __future__ import annotations

import numpy as np
import torch

from drgn_core.curriculum import radius_at, resolve_curriculum
from drgn_core.errors import DrgnError
from drgn_core.models import HetVAE, slice_coords


class DecoderPixels:
    """The pixels one phase of training evaluates the decoder at: inside `radius`, top `keep` by CTF²."""

    def __init__(self, model: HetVAE, radius: int, keep: float = 1.0, snr: np.ndarray | None = None):
        if not 0.0 < keep <= 1.0:
            raise DrgnError(f"--pixel-keep must be in (0, 1], got {keep}")
        lat, dev = model.lattice, model.coords2d.device
        D = lat.D
        ij = np.rint(lat.coords * D).astype(np.int64)          # integer frequency indices (kx, ky)
        inner = np.flatnonzero((ij**2).sum(-1) < int(radius) ** 2)
        self.radius, self.keep, self.D = int(radius), float(keep), D
        self.full_circle = len(inner) == lat.P
        self.inner = torch.from_numpy(inner).to(dev)               # (P_r,) into the half lattice
        self.coords = model.coords2d[self.inner]                  # (P_r, 2)
        self.weights = model.weights[self.inner]                  # (P_r,)
        self.n_full = int(lat.weights[inner].sum())               # in-circle pixels of the 2r crop
        mask = torch.zeros(lat.P, device=dev)
        mask[self.inner] = 1.0
        self.enc_mask = mask[None, :, None]                       # (1, P, 1) zero outside the radius
        self.k = max(1, round(self.keep * len(inner)))            # decoder points per image
        # --pixel-by snr: the spectral SNR at each pixel's radius, times CTF² below (a floor keeps the CTF²
        # order among pixels of no measurable signal)
        self.snr = None
        if snr is not None:
            r = np.rint(np.sqrt((ij[inner] ** 2).sum(-1))).astype(np.int64)
            self.snr = torch.from_numpy(np.asarray(snr, np.float64)[r] + 1e-6).float().to(dev)  # (P_r,)

    @property
    def points(self) -> int:
        """Decoder evaluations per image."""
        return self.k

    def encoder_input(self, y: torch.Tensor) -> torch.Tensor:
        """The images the encoder sees: zero outside the radius (unchanged over the full circle)."""
        return y if self.full_circle else y * self.enc_mask

    def chosen(self, ctf: torch.Tensor) -> torch.Tensor:
        """(B, K) indices into this phase's pixels of each image's K largest CTF² (× SNR(r) for snr)."""
        score = ctf.float().pow(2) if self.snr is None else ctf.float().pow(2) * self.snr
        return torch.topk(score, self.k, dim=1, sorted=False).indices

    def predict(self, model: HetVAE, batch, z: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CTF-weighted decoded values, observed values, Hermitian weights) at this phase's pixels:
        (B, P_r or K, 2), the same, and (P_r,) shared or (B, K) per image."""
        y = batch.y if self.full_circle else batch.y[:, self.inner]      # (B, P_r, 2)
        ctf = batch.ctf if self.full_circle else batch.ctf[:, self.inner]  # (B, P_r)
        if self.k == len(self.inner):
            pred = model.decoder(slice_coords(self.coords, batch.A), z) * ctf[..., None]
            return pred, y, self.weights
        idx = self.chosen(ctf)                                                     # (B, K)
        coords = self.coords[idx]                                                  # (B, K, 2)
        pred = model.decoder(slice_coords(coords, batch.A), z) * ctf.gather(1, idx)[..., None]
        y_k = y.gather(1, idx[..., None].expand(-1, -1, 2))
        return pred, y_k, self.weights[idx]


def decoder_pixels(model: HetVAE, curriculum: str, keep: float, epoch: int, epochs: int,
                   snr: np.ndarray | None = None) -> DecoderPixels | None:
    """The pixels of epoch `epoch` (0-based) of a run of `epochs` with these --curriculum and --pixel-keep
    settings (`snr`: the spectral SNR by radius for --pixel-by snr); None when that is every pixel
    (training then takes the default path, unchanged)."""
    D = model.cfg.D
    radius = radius_at(resolve_curriculum(curriculum, D, epochs), D, epoch)
    if radius >= D // 2 and keep >= 1.0:
        return None
    return DecoderPixels(model, radius, keep, snr)


@torch.no_grad()
def snr_by_radius(data, positions: np.ndarray, n_sample: int = 1000) -> np.ndarray:
    """Spectral SNR S(r)/N per integer Fourier radius r = 0..D/2 of the images at `positions` (the first
    `n_sample` of them, sorted: deterministic, so a resumed run ranks pixels the same).

    P(r), the mean |y|² at radius r, is ⟨CTF²⟩(r)·S(r) + N for white noise N; N is taken as the median
    of P over the outer fifth of the radii (where the CTF envelope has left little signal: an over-estimate
    of N only lowers the SNR of the outer shells, which is where it is smallest anyway).
    """
    lat = data.lattice
    D = lat.D
    r = np.rint(np.linalg.norm(lat.coords * D, axis=-1)).astype(np.int64)
    pos = np.sort(np.asarray(positions))[:n_sample]
    power, ctf2 = torch.zeros(lat.P, dtype=torch.float64), torch.zeros(lat.P, dtype=torch.float64)
    for b in data.batches(pos, 256):
        power += b.y.double().pow(2).sum(-1).sum(0).cpu()
        ctf2 += b.ctf.double().pow(2).sum(0).cpu()
    count = np.bincount(r, minlength=D // 2 + 1).astype(np.float64)
    seen = np.maximum(count, 1) * max(len(pos), 1)
    p = np.bincount(r, power.numpy(), minlength=D // 2 + 1) / seen
    c = np.bincount(r, ctf2.numpy(), minlength=D // 2 + 1) / seen
    outer = (np.arange(D // 2 + 1) >= 0.8 * (D // 2)) & (count > 0)
    noise = float(np.median(p[outer]))
    return np.where(count > 0, np.maximum(p - noise, 0.0) / np.maximum(c, 1e-6) / max(noise, 1e-30), 0.0)
