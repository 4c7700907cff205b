"""Gradient-descent refinement of the searched poses together with the cryoDRGN model.

After the search, every particle has a pose A₀ and a shift t₀ (px). Training then fits the usual model
(decoder, and the encoder when zdim > 0; `drgn_core.models.HetVAE`) with a per-particle correction
(δ, Δt) ∈ ℝ³ × ℝ² held in a sparse embedding and updated by SparseAdam on the rows of each batch only:

    A = exp(δ)·A₀,   the image ≈ CTF · slice(A, z) · e^{2πi k·Δt}   (images prepared with t₀ undone)

so memory and time per step do not depend on the number of particles, and the images are prepared once
(`drgn_core.data.ParticleData`, in memory or streamed). The first `pose_start` epochs fit the model alone
(an untrained decoder gives pose gradients without meaning); the later ones move the poses too.
Checkpoints are written at each epoch's end: weights, both optimizers' states, the pose corrections and
the generator, so a resumed run ends with the same numbers as an uninterrupted one (on the CPU).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from drgn_core.abinit.grid import so3_exp
from drgn_core.data import ParticleData
from drgn_core.io.atomic import atomic_path
from drgn_core.models import HetVAE, image_mse, vae_loss
from drgn_core.progress import progress_bar

REFINE_FORMAT = "drgnflow-abinit-refine/1"


@dataclass
class RefineConfig:
    """Settings of the gradient-descent phase (config.yaml: abinit.refine)."""

    epochs: int = 20
    pose_start: int = 5          # epochs of model-only training before the poses move too
    batch_size: int = 8          # paper default (as drgn train)
    lr: float = 1e-4             # Adam, model
    pose_lr: float = 1e-3        # SparseAdam, per-particle rotation (rad) and shift (px) corrections
    beta: float | None = None    # KL weight; None → 1/zdim

    @classmethod
    def from_dict(cls, d: dict) -> RefineConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


def shift_factor(coords: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """(B, P, 2) real/imag of e^{2πi k·Δt} for corrections Δt (B, 2) px on the half lattice (P, 2)."""
    ph = 2.0 * math.pi * (dt @ coords.T)
    return torch.stack([torch.cos(ph), torch.sin(ph)], dim=-1)


def _cmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([a[..., 0] * b[..., 0] - a[..., 1] * b[..., 1],
                        a[..., 0] * b[..., 1] + a[..., 1] * b[..., 0]], dim=-1)


def step_loss(model: HetVAE, emb: torch.nn.Embedding, batch, beta: float, move_poses: bool,
              gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean MSE, mean KL) of one batch at the corrected poses (z sampled when `gen` is given)."""
    corr = emb(batch.pos.to(batch.y.device))                                   # (B, 5)
    if not move_poses:
        corr = corr.detach()
    A = so3_exp(corr[:, :3]) @ batch.A
    mu = logvar = z = None
    if model.zdim > 0:
        mu, logvar = model.encode(batch.y, batch.ctf)
        z = mu
        if gen is not None:
            z = mu + torch.randn(mu.shape, generator=gen, device=mu.device) * torch.exp(0.5 * logvar)
    pred = model.slice(A, z) * batch.ctf[..., None]
    pred = _cmul(pred, shift_factor(model.coords2d, corr[:, 3:]))
    mse = image_mse(pred, batch.y, model.weights, model.lattice.n_full)
    loss, kl = vae_loss(mse, mu, logvar, beta, model.lattice.n_full)
    return loss, mse.mean(), kl


def save_state(path: Path, model: HetVAE, emb: torch.nn.Embedding, opt, popt, gen: torch.Generator,
               epoch: int, log: list[dict]) -> None:
    payload = {"format": REFINE_FORMAT, "model": model.state_dict(), "pose": emb.state_dict(),
               "optimizer": opt.state_dict(), "pose_optimizer": popt.state_dict(), "rng": gen.get_state(),
               "epoch": epoch, "log": log}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def refine(model: HetVAE, data: ParticleData, rcfg: RefineConfig, seed: int, ck_path: Path,
           progress: bool = True, log=print) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Train the model and the pose corrections; returns (corrected poses (N, 3, 3), shift corrections
    (N, 2) px, per-epoch log rows). Resumes from `ck_path` when it exists."""
    from drgn_core.train import peak_memory_mib

    dev = data.device
    emb = torch.nn.Embedding(data.n, 5, sparse=True).to(dev)
    torch.nn.init.zeros_(emb.weight)
    opt = torch.optim.Adam(model.parameters(), lr=rcfg.lr)
    popt = torch.optim.SparseAdam(list(emb.parameters()), lr=rcfg.pose_lr)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed + 1)
    beta = rcfg.beta if rcfg.beta is not None else (1.0 / model.zdim if model.zdim else 0.0)
    epoch, rows = 0, []
    if ck_path.exists():
        ck = torch.load(ck_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        emb.load_state_dict(ck["pose"])
        opt.load_state_dict(ck["optimizer"])
        popt.load_state_dict(ck["pose_optimizer"])
        gen.set_state(ck["rng"])
        epoch, rows = int(ck["epoch"]), list(ck["log"])
        log(f"resuming the refinement at epoch {epoch + 1}/{rcfg.epochs}" if epoch < rcfg.epochs
            else f"the refinement's {rcfg.epochs} epochs are complete (checkpoint {ck_path.name})")
    model.train()
    positions = np.arange(data.n)
    while epoch < rcfg.epochs:
        move = epoch >= rcfg.pose_start
        sums, n_img, t0 = np.zeros(3), 0, time.perf_counter()
        order = data.epoch_order(positions, seed, epoch)
        bar = progress_bar(total=math.ceil(data.n / rcfg.batch_size),
                           desc=f"refine {epoch + 1}/{rcfg.epochs}", unit="batch", disable=not progress,
                           leave=False, mininterval=1.0, file=sys.stderr)
        for batch in data.batches(order, rcfg.batch_size):
            opt.zero_grad(set_to_none=True)
            popt.zero_grad(set_to_none=True)
            loss, mse, kl = step_loss(model, emb, batch, beta, move, gen)
            loss.backward()
            opt.step()
            if move:
                popt.step()
            b = len(batch.pos)
            sums += b * np.array([loss.item(), mse.item(), kl.item()])
            n_img += b
            bar.update(1)
        bar.close()
        secs = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "loss": sums[0] / n_img, "mse": sums[1] / n_img, "kl": sums[2] / n_img,
               "val_loss": math.nan, "val_mse": math.nan, "val_kl": math.nan, "images_per_s": n_img / secs,
               "seconds": secs, "peak_mem_MiB": peak_memory_mib(dev), "lr": rcfg.lr}
        rows.append({k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()})
        moving = " (poses moving)" if move else ""
        log(f"refine epoch {epoch + 1}/{rcfg.epochs}{moving}  loss {row['loss']:.5f}  "
            f"{row['images_per_s']:.1f} img/s")
        epoch += 1
        save_state(ck_path, model, emb, opt, popt, gen, epoch, rows)
    with torch.no_grad():
        corr = emb.weight.detach().double().cpu()
        A = (so3_exp(corr[:, :3]) @ data.A.double().cpu()).numpy()
    return A, corr[:, 3:].numpy(), rows
