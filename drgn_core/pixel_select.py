"""Which pixels of each image the decoder is evaluated at in training: a Fourier radius, and the top CTF².

The decoder costs the same at every pixel, so fewer pixels per image is fewer FLOPs. Two levers of
`drgn train`, which may be combined (docs/architecture.md § Resolution curriculum; docs/usage.md § Fewer
FLOPs):

- a radius r (the curriculum, drgn_core.curriculum): only half-lattice pixels with |k|·D < r. This is
  *exactly* training on the images Fourier-cropped to a 2r box with the same normalisation scale times
  (2r/D)²: the same lattice points, the same values, and a loss normalised by the number of in-circle
  pixels of that crop (for the MSE and the KL term alike, as a run at that box would). The encoder sees
  only those pixels too (the others are zeroed, which is the cropped encoder with its other input
  columns untouched: their gradient is exactly zero, so Adam leaves them where they were).
- `keep` F < 1 (--pixel-keep): of those pixels, each image keeps its K = round(F·P) with the largest
  CTF². Under white noise the Fisher information of a pixel about the map is ∝ CTF², so these carry
  most of the information (the top 70 % about 95 % of ΣCTF² at typical defoci). K is fixed, so the
  shapes stay static. The kept squared errors are summed with their Hermitian weights and divided by
  the number of in-circle pixels of the whole image, not of the kept ones: the gradient is then the
  full loss's gradient less the terms of the dropped pixels, which are ∝ CTF and small, and the balance
  between the data term and β·KL is that of the full loss. The selection is a deterministic function of
  the CTF, so it is the same every epoch and for the validation loss. The encoder sees every pixel
  inside the radius: it is cheap, and it needs the low-CTF² pixels no less than before.

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

    def __init__(self, model: HetVAE, radius: int, keep: float = 1.0):
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

    @property
    def points(self) -> int:
        """Decoder evaluations per image."""
        return self.k

    def encoder_input(self, y: torch.Tensor) -> torch.Tensor:
        """The images the encoder sees: zero outside the radius (unchanged over the full circle)."""
        return y if self.full_circle else y * self.enc_mask

    def predict(self, model: HetVAE, batch, z: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CTF-weighted decoded values, observed values, Hermitian weights) at this phase's pixels:
        (B, P_r or K, 2), the same, and (P_r,) shared or (B, K) per image."""
        y = batch.y if self.full_circle else batch.y[:, self.inner]      # (B, P_r, 2)
        ctf = batch.ctf if self.full_circle else batch.ctf[:, self.inner]  # (B, P_r)
        if self.k == len(self.inner):
            pred = model.decoder(slice_coords(self.coords, batch.A), z) * ctf[..., None]
            return pred, y, self.weights
        idx = torch.topk(ctf.float().pow(2), self.k, dim=1, sorted=False).indices  # (B, K)
        coords = self.coords[idx]                                                  # (B, K, 2)
        pred = model.decoder(slice_coords(coords, batch.A), z) * ctf.gather(1, idx)[..., None]
        y_k = y.gather(1, idx[..., None].expand(-1, -1, 2))
        return pred, y_k, self.weights[idx]


def decoder_pixels(model: HetVAE, curriculum: str, keep: float, epoch: int, epochs: int
                   ) -> DecoderPixels | None:
    """The pixels of epoch `epoch` (0-based) of a run of `epochs` with these --curriculum and --pixel-keep
    settings; None when that is every pixel (training then takes the default path, unchanged)."""
    D = model.cfg.D
    radius = radius_at(resolve_curriculum(curriculum, D, epochs), D, epoch)
    if radius >= D // 2 and keep >= 1.0:
        return None
    return DecoderPixels(model, radius, keep)
