"""Run folders whose decoder is known to make the ground-truth maps, for the landscape tests.

The landscape analysis is tested against ground truth, so the maps it decodes must be the simulated
ones: rather than training a VAE on images (minutes, and the result depends on training quality), the
decoder of a real `HetVAE` is fitted directly to the true maps' Fourier transforms at chosen latent points
(a few seconds). The run folder then holds an ordinary model.pt, z.npy and indices.npy, and
`drgn landscape` reads it through `drgn_core.rundir` exactly as it reads a trained run.

True maps are those of tests/conftest_train.py's fixed phantom (`parts`): the compositional states
(core, core + arm, core + arm + lump) and the hinge of the arm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest_train import HINGE_AXIS, concat, hinge, parts


def compositional_maps(D: int) -> list[np.ndarray]:
    """The three compositional states' true maps (core, core + arm, core + arm + lump), box D."""
    core, arm, lump, _ = parts(D)
    return [o.volume(D) for o in (core, concat(core, arm), concat(core, arm, lump))]


def hinge_maps(D: int, coords: np.ndarray) -> list[np.ndarray]:
    """True maps of the hinge at fractions `coords` ∈ [0, 1] of its 1.5 rad range (as conftest_train)."""
    core, arm, _, pivot = parts(D)
    return [hinge(core, arm, 1.5 * (c - 0.5), axis=HINGE_AXIS, pivot=pivot).volume(D) for c in coords]


def fitted_run(path: Path, z_points: np.ndarray, maps: list[np.ndarray], map_of_point: np.ndarray,
               z_particles: np.ndarray, indices: np.ndarray | None = None, apix: float = 4.0,
               steps: int = 1000, seed: int = 0) -> Path:
    """A run folder whose decoder maps z_points[i] to maps[map_of_point[i]] (fitted), with the particles'
    latents `z_particles` and canonical rows `indices` (default 0..N-1)."""
    import torch

    from drgn_core import models

    D = maps[0].shape[-1]
    zdim = z_points.shape[1]
    flat, _, q = models._grid_half(D, D)
    F = np.stack([np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(v))).ravel()[flat] for v in maps])
    scale = float(np.abs(F).std())
    target = torch.from_numpy(np.stack([F.real, F.imag], -1) / scale).float()   # (n_maps, P, 2)
    torch.manual_seed(seed)
    cfg = models.ModelConfig(D=D, zdim=zdim, enc_dim=16, enc_layers=1, dec_dim=64, dec_layers=2, apix=apix,
                             norm_scale=scale)
    model = models.HetVAE(cfg)
    opt = torch.optim.Adam(model.decoder.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    qt = torch.from_numpy(q).float()
    zt = torch.from_numpy(np.asarray(z_points, np.float32))
    which = torch.from_numpy(np.asarray(map_of_point, np.int64))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = torch.randint(len(zt), (4,), generator=g)
        p = torch.randint(len(qt), (2048,), generator=g)   # a random subset of the grid per step
        pred = model.decoder(qt[p][None].expand(len(b), -1, -1), zt[b])
        loss = ((pred - target[which[b]][:, p]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    path.mkdir(parents=True, exist_ok=True)
    torch.save(models.model_payload(model, cfg), path / "model.pt")
    np.save(path / "z.npy", np.asarray(z_particles, np.float32))
    ind = np.arange(len(z_particles)) if indices is None else np.asarray(indices, np.int64)
    np.save(path / "indices.npy", ind)
    return path


def corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps' voxels."""
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])
