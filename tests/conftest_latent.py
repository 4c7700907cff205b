"""Helpers for the latent-space tests (analysis, filtering, traversal, evaluate): synthetic run folders.

A "run" here is what `drgn train` leaves behind, built directly: `z.npy` and `indices.npy` from arrays the
test chooses (so every expected answer is known), plus, where volumes are needed, a `model.pt` holding a
tiny untrained model — the volume plumbing (files, voxel size, z_values.txt, FSC) does not depend on the
weights being trained. A minimal canonical table with ground-truth columns is written the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def make_run(path: Path, z: np.ndarray, indices: np.ndarray | None = None) -> Path:
    """A run folder with z.npy (float32) and indices.npy (int64; default 0..N-1)."""
    path.mkdir(parents=True, exist_ok=True)
    z = np.asarray(z, dtype=np.float32)
    if z.ndim == 1:
        z = z[:, None]
    np.save(path / "z.npy", z)
    np.save(path / "indices.npy", np.arange(len(z)) if indices is None else np.asarray(indices, np.int64))
    return path


def add_tiny_model(run: Path, zdim: int, D: int = 16, apix: float = 2.5, seed: int = 0) -> None:
    """Write model.pt with a small random (untrained) model into `run`."""
    import torch

    from drgn_core import models

    torch.manual_seed(seed)
    cfg = models.ModelConfig(D=D, zdim=zdim, enc_dim=16, enc_layers=1, dec_dim=16, dec_layers=1, apix=apix)
    model = models.HetVAE(cfg)
    torch.save(models.model_payload(model, cfg), run / "model.pt")


def write_gt_table(path: Path, n: int, coord=None, state=None, junk=None, volume=None,
                   box: int = 16, apix: float = 2.5) -> Path:
    """A minimal canonical table (poses, CTF, stack location) with the four ground-truth columns."""
    from drgn_core.io.table import ParticleTable, write_table

    optics = pd.DataFrame({"rlnOpticsGroupName": ["og1"], "rlnOpticsGroup": [1], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    zeros = np.zeros(n)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
        "rlnAngleRot": zeros, "rlnAngleTilt": zeros, "rlnAnglePsi": zeros,
        "rlnOriginXAngst": zeros, "rlnOriginYAngst": zeros,
        "rlnDefocusU": zeros + 1e4, "rlnDefocusV": zeros + 1e4, "rlnDefocusAngle": zeros,
        "rlnOpticsGroup": np.ones(n, dtype=int),
        "drgnStackPath": ["particles.mrcs"] * n, "drgnStackIndex": np.arange(n), "drgnImageSign": np.ones(n),
        "drgnSourceRow": np.arange(n),
        "drgnGtState": np.zeros(n, int) if state is None else np.asarray(state),
        "drgnGtCoord": np.full(n, np.nan) if coord is None else np.asarray(coord, float),
        "drgnGtJunk": np.zeros(n, int) if junk is None else np.asarray(junk, int),
        "drgnGtVolume": np.zeros(n, int) if volume is None else np.asarray(volume),
    })
    write_table(ParticleTable(particles, optics), path)
    return path


def clusters(rng: np.random.Generator, centres: np.ndarray, sizes, scale: float = 0.3) -> tuple[np.ndarray,
                                                                                              np.ndarray]:
    """Gaussian clusters around `centres` → (z, label of each row)."""
    labels = np.repeat(np.arange(len(centres)), sizes)
    z = centres[labels] + scale * rng.normal(size=(len(labels), centres.shape[1]))
    return z.astype(np.float32), labels
