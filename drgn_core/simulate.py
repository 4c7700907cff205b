"""Simulated cryo-EM datasets with known ground truth (the paper's simulation protocol, configurable).

A dataset is made as the paper's Methods describe: ground-truth density maps from an atomic model (here a
procedural protein-like model, or a PDB/mmCIF file), uniform random poses on SO(3), uniform in-plane
shifts, a CTF with random defocus and astigmatism and a B-factor envelope, then white Gaussian noise at a
signal-to-noise ratio defined on the whole box: SNR = variance of all pixels of the clean particle images
/ noise variance. Continuous heterogeneity renders 50 maps along a hinge motion (1.5 rad) and draws each
particle's reaction coordinate c from a uniform or three-component Gaussian mixture; the particle is
rendered from the map of its bin, its exact c kept as ground truth. Compositional heterogeneity draws
states with uneven populations (0.2/0.3/0.5 for three, like 30S/50S/70S in the paper). A fraction of the
images can be junk: pure noise, unrelated objects, or ice-like blobs.

Outputs in `outdir` (a contract other stages rely on; see docs/architecture.md):
    table.star        canonical table with ground-truth columns, stack 'particles.mrcs'
    particles.mrcs    the noisy images, float32, protein bright
    particles.star    RELION 3.1 STAR of the same particles;  particles.cs  cryoSPARC .cs
    gt_volumes/       vol_000.mrc … (positive density, the dataset's D and apix) and coords.txt
    gt.json           the settings, SNR, noise σ, counts per state and junk kind
    clean.mrcs        (only with write_clean) the noise-free images

Memory stays bounded: images are rendered volume by volume in chunks straight into a memory-mapped stack,
and noise is added in a second streaming pass once the signal variance over all clean images is known
(so the SNR is exact, not estimated from a sample). One seed fixes every random choice; each consumer
(model, particles, junk, noise, uids) draws from its own child stream, so outputs are byte-identical for a
seed and a change to one setting does not reshuffle unrelated ones.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from drgn_core import __version__
from drgn_core.errors import DrgnError, collect
from drgn_core.phantoms import AtomicModel, Hinge

if TYPE_CHECKING:
    from mrcfile.mrcmemmap import MrcMemmap as MrcFile
    from tqdm import tqdm

HETEROGENEITY = ("continuous", "compositional", "none")
DISTRIBUTIONS = ("uniform", "cooperative", "noncontiguous")
JUNK_KINDS = ("noise", "decoy", "ice")
JUNK_KIND_CODES = {"particle": 0, "noise": 1, "decoy": 2, "ice": 3}  # drgnGtJunkKind
# Paper: GMM means at the 10th, 25th and 40th of 50 maps; σ 0.09 rad (cooperative) and 0.03 rad.
GMM_MEANS_C = (9 / 49, 24 / 49, 39 / 49)
GMM_SIGMA_RAD = {"cooperative": 0.09, "noncontiguous": 0.03}
STATE_DEFINITIONS = {  # what drgnGtState means, recorded in gt.json
    "continuous": "Gaussian-mixture component the particle's c was drawn from (0 for uniform); -1 junk",
    "compositional": "state k = core + subunits 1..k; -1 junk",
    "none": "0 for every particle; -1 junk",
}
PAPER_STATE_WEIGHTS = (0.2, 0.3, 0.5)  # 10,000 / 15,000 / 25,000 particles of 30S / 50S / 70S
DEFAULT_N_ATOMS = 3000
N_DECOY_MODELS = 3
NOISE_BLOCK = 1024  # rows per noise stream: fixed, so the noise does not depend on chunk sizes


@dataclass
class SimConfig:
    """Every setting of a simulated dataset. Units: Å, Å², kV, mm, px (shift_max_px), rad (hinge)."""

    n: int = 2000
    D: int = 64
    apix: float = 3.0
    snr: float = 0.1
    heterogeneity: str = "continuous"
    distribution: str = "uniform"
    n_states: int = 3
    state_weights: tuple[float, ...] | None = None  # default: 0.2/0.3/0.5 for 3 states, else ∝ 1..n
    n_gt: int = 50  # ground-truth maps along the reaction coordinate (continuous)
    hinge_range: float = 1.5  # total hinge rotation (rad)
    junk_fraction: float = 0.0
    junk_kinds: tuple[str, ...] = JUNK_KINDS
    shift_max_px: float = 4.0
    defocus_min: float = 10000.0
    defocus_max: float = 25000.0
    astigmatism: float = 500.0  # defocus V = U - uniform(0, astigmatism)
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amp_contrast: float = 0.1
    bfactor: float = 100.0
    resolution: float | None = None  # Å of the ground-truth maps; default 2·apix (Nyquist)
    n_atoms: int | None = None  # procedural model size; default 3000, fewer if the box is too small
    model_path: str | None = None  # PDB/mmCIF source instead of the procedural model
    seed: int = 0
    # Seed of the object alone (default: `seed`). Two sessions of one specimen share the object but not
    # the particles: simulate each with its own --seed, one --model-seed, its own --apix, and the same
    # --n-atoms and --resolution, so the maps are one structure sampled at each pixel size.
    model_seed: int | None = None
    write_clean: bool = False

    @property
    def map_resolution(self) -> float:
        return float(self.resolution) if self.resolution is not None else 2.0 * self.apix

    def weights(self) -> np.ndarray:
        """Normalised state populations (compositional)."""
        if self.state_weights is not None:
            w = np.asarray(self.state_weights, dtype=np.float64)
        elif self.n_states == 3:
            w = np.asarray(PAPER_STATE_WEIGHTS)
        else:
            w = np.arange(1, self.n_states + 1, dtype=np.float64)
        return w / w.sum()

    def problems(self) -> list[str]:
        """Every invalid setting, named by its command-line option."""
        p = []
        if self.n < 1:
            p.append(f"--n must be >= 1 (got {self.n})")
        if self.D < 8 or self.D % 2:
            p.append(f"-D must be an even box size >= 8 (got {self.D})")
        if not self.apix > 0:
            p.append(f"--apix must be > 0 (got {self.apix})")
        if not self.snr > 0:
            p.append(f"--snr must be > 0 (got {self.snr})")
        if self.heterogeneity not in HETEROGENEITY:
            p.append(f"--heterogeneity must be one of {', '.join(HETEROGENEITY)} "
                     f"(got {self.heterogeneity!r})")
        if self.distribution not in DISTRIBUTIONS:
            p.append(f"--distribution must be one of {', '.join(DISTRIBUTIONS)} "
                     f"(got {self.distribution!r})")
        if self.heterogeneity == "compositional" and self.n_states < 2:
            p.append(f"--n-states must be >= 2 for compositional heterogeneity (got {self.n_states})")
        if self.state_weights is not None and (len(self.state_weights) != self.n_states
                                               or min(self.state_weights) <= 0):
            p.append(f"--state-weights needs {self.n_states} positive numbers "
                     f"(got {list(self.state_weights)})")
        if self.n_gt < 2:
            p.append(f"--n-gt must be >= 2 (got {self.n_gt})")
        if not 0 <= self.junk_fraction < 1:
            p.append(f"--junk-fraction must be in [0, 1) (got {self.junk_fraction})")
        bad = [k for k in self.junk_kinds if k not in JUNK_KINDS]
        if bad or not self.junk_kinds:
            p.append(f"--junk-kinds must be a non-empty list from {', '.join(JUNK_KINDS)} (got "
                     f"{','.join(self.junk_kinds)})")
        if self.shift_max_px < 0:
            p.append(f"--shift-max must be >= 0 (got {self.shift_max_px})")
        if not 0 < self.defocus_min <= self.defocus_max:
            p.append(f"--defocus needs 0 < MIN <= MAX Å (got {self.defocus_min}, {self.defocus_max})")
        if not 0 <= self.astigmatism < self.defocus_min:
            p.append(f"--astigmatism must be in [0, defocus min) Å (got {self.astigmatism})")
        if not self.voltage_kv > 0:
            p.append(f"--voltage must be > 0 kV (got {self.voltage_kv})")
        if self.cs_mm < 0:
            p.append(f"--cs must be >= 0 mm (got {self.cs_mm})")
        if not 0 <= self.amp_contrast < 1:
            p.append(f"--amp-contrast must be in [0, 1) (got {self.amp_contrast})")
        if self.bfactor < 0:
            p.append(f"--bfactor must be >= 0 Å² (got {self.bfactor})")
        if self.resolution is not None and not self.resolution > 0:
            p.append(f"--resolution must be > 0 Å (got {self.resolution})")
        if self.n_atoms is not None and self.n_atoms < 10:
            p.append(f"--n-atoms must be >= 10 (got {self.n_atoms})")
        if self.hinge_range <= 0:
            p.append(f"--hinge-range must be > 0 rad (got {self.hinge_range})")
        return p

    def validate(self) -> None:
        collect(self.problems(), None, "invalid simulation settings")


# ---- ground truth ----------------------------------------------------------------------------------

@dataclass
class GroundTruth:
    """The maps particles come from: volume j is `render(j)`, at coordinate coords[j] in state states[j]."""

    render: Callable[[int], np.ndarray]
    coords: np.ndarray  # (n_vol,) reaction coordinate of each map (NaN where none)
    states: np.ndarray  # (n_vol,) state of each map
    model: AtomicModel
    hinge: Hinge | None
    n_atoms: int
    source: str


def _allowed_radius(cfg: SimConfig) -> float:
    """Largest atom radius (Å) that keeps the blurred particle inside the box at the largest shift."""
    from drgn_core.phantoms import gaussian_sigma

    blur = 2 * gaussian_sigma(cfg.map_resolution)
    return cfg.D / 2 * cfg.apix - cfg.shift_max_px * cfg.apix - blur - cfg.apix


def _conformations(cfg: SimConfig, model: AtomicModel, hinge: Hinge | None) -> list[AtomicModel]:
    """Models whose extent bounds every map (hinge sampled densely enough for its end points)."""
    if hinge is None:
        return [model]
    return [hinge.apply(model, c) for c in np.linspace(0.0, 1.0, 11)]


def _build_model(cfg: SimConfig, seed: np.random.SeedSequence) -> tuple[AtomicModel, Hinge | None, int, str]:
    """The source model (and hinge), sized to the box; errors name the option to change."""
    from drgn_core import phantoms

    r_allow = _allowed_radius(cfg)
    box_A = cfg.D * cfg.apix

    def procedural(n_atoms: int) -> tuple[AtomicModel, Hinge | None]:
        rng = np.random.default_rng(seed)
        if cfg.heterogeneity == "compositional":
            return phantoms.compositional_phantom(n_atoms, cfg.n_states, rng), None
        model, hinge = phantoms.hinge_phantom(n_atoms, rng, cfg.hinge_range)
        return model, (hinge if cfg.heterogeneity == "continuous" else None)

    def radius(model: AtomicModel, hinge: Hinge | None) -> float:
        return max(m.max_radius() for m in _conformations(cfg, model, hinge))

    if cfg.model_path is not None:
        model = phantoms.load_atomic_model(cfg.model_path)
        hinge = None
        if cfg.heterogeneity == "continuous":
            model, hinge = phantoms.hinge_from_model(model, cfg.hinge_range)
        elif cfg.heterogeneity == "compositional":
            model = phantoms.compositional_from_model(model, cfg.n_states, cfg.model_path)
        r = radius(model, hinge)
        if r > r_allow:
            raise DrgnError(f"the model reaches {r:.0f} Å from its centre, but a box of {cfg.D} px × "
                            f"{cfg.apix:g} Å = {box_A:.0f} Å with shifts up to {cfg.shift_max_px:g} px holds "
                            f"{max(r_allow, 0):.0f} Å; use a larger -D or --apix, or a smaller --shift-max",
                            cfg.model_path)
        return model, hinge, len(model), str(cfg.model_path)

    n_atoms = DEFAULT_N_ATOMS if cfg.n_atoms is None else cfg.n_atoms
    while True:
        model, hinge = procedural(n_atoms)
        r = radius(model, hinge)
        if r <= r_allow:
            return model, hinge, n_atoms, "procedural"
        if cfg.n_atoms is not None or n_atoms <= 50:
            fit = int(n_atoms * (max(r_allow, 0) / r) ** 3 * 0.95)
            hint = f"--n-atoms {fit} or fewer" if cfg.n_atoms is not None and fit >= 10 else "fewer atoms"
            raise DrgnError(f"a model of {n_atoms} atoms reaches {r:.0f} Å from its centre, but a box of "
                            f"{cfg.D} px × {cfg.apix:g} Å = {box_A:.0f} Å with shifts up to "
                            f"{cfg.shift_max_px:g} px holds {max(r_allow, 0):.0f} Å; use a larger -D or "
                            f"--apix, {hint}, or a smaller --shift-max")
        # Default size: shrink to fit (radius ∝ atoms^(1/3)), then verify on the rebuilt model.
        n_atoms = max(50, min(n_atoms - 1, int(n_atoms * (max(r_allow, 0) / r) ** 3 * 0.97)))


def build_ground_truth(cfg: SimConfig, seed: np.random.SeedSequence) -> GroundTruth:
    """The ground-truth maps of the dataset: n_gt along the hinge, one per state, or one."""
    from drgn_core.phantoms import render_density

    model, hinge, n_atoms, source = _build_model(cfg, seed)
    res = cfg.map_resolution

    if cfg.heterogeneity == "continuous":
        coords = np.linspace(0.0, 1.0, cfg.n_gt)
        states = np.zeros(cfg.n_gt, dtype=np.int64)
        moving = model.domains == hinge.domain
        fixed = render_density(model.select(~moving), cfg.D, cfg.apix, res)  # once: only the arm moves

        def render(j: int) -> np.ndarray:
            return fixed + render_density(hinge.apply(model, coords[j]).select(moving), cfg.D, cfg.apix, res)
    elif cfg.heterogeneity == "compositional":
        coords = np.full(cfg.n_states, np.nan)
        states = np.arange(cfg.n_states, dtype=np.int64)
        parts = [render_density(model.select(model.domains == d), cfg.D, cfg.apix, res)
                 for d in range(cfg.n_states)]

        def render(j: int) -> np.ndarray:
            return np.sum(parts[: j + 1], axis=0, dtype=np.float32)  # state j: core + subunits 1..j
    else:
        coords = np.full(1, np.nan)
        states = np.zeros(1, dtype=np.int64)
        vol = render_density(model, cfg.D, cfg.apix, res)

        def render(j: int) -> np.ndarray:
            return vol

    return GroundTruth(render, coords, states, model, hinge, n_atoms, source)


# ---- per-particle draws ----------------------------------------------------------------------------

@dataclass
class Particles:
    """Per-row draws: poses, origins, CTF, ground truth and junk kind."""

    A: np.ndarray  # (n, 3, 3)
    origin_px: np.ndarray  # (n, 2) RELION origins (the particle sits at -origin)
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    subset: np.ndarray  # rlnRandomSubset, 1 or 2
    state: np.ndarray  # drgnGtState (-1 junk)
    coord: np.ndarray  # drgnGtCoord (NaN junk / none)
    volume: np.ndarray  # drgnGtVolume (-1 junk)
    junk_kind: np.ndarray  # drgnGtJunkKind code (0 = particle)

    def ctf_params(self, cfg: SimConfig) -> np.ndarray:
        """(n, 9) in drgn_core.ctf.CTF_COLUMNS order."""
        n = len(self.A)
        return np.stack([np.full(n, cfg.apix), self.defocus_u, self.defocus_v, self.defocus_angle,
                         np.full(n, cfg.voltage_kv), np.full(n, cfg.cs_mm), np.full(n, cfg.amp_contrast),
                         np.zeros(n), np.full(n, cfg.bfactor)], axis=1)


def sample_coordinates(cfg: SimConfig, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(c, component) for m particles: uniform on [0, 1], or the paper's 3-component GMM, clipped."""
    if cfg.distribution == "uniform":
        return rng.uniform(0.0, 1.0, m), np.zeros(m, dtype=np.int64)
    comp = rng.integers(0, len(GMM_MEANS_C), m)
    sigma_c = GMM_SIGMA_RAD[cfg.distribution] / cfg.hinge_range
    c = np.asarray(GMM_MEANS_C)[comp] + sigma_c * rng.standard_normal(m)
    return np.clip(c, 0.0, 1.0), comp.astype(np.int64)


def draw_particles(cfg: SimConfig, rng: np.random.Generator) -> Particles:
    """Poses, shifts, CTF, junk rows and heterogeneity for every row, from one generator."""
    from drgn_core.pose import random_poses

    n = cfg.n
    A = random_poses(n, rng)
    disp = rng.uniform(-cfg.shift_max_px, cfg.shift_max_px, (n, 2))
    dfu = rng.uniform(cfg.defocus_min, cfg.defocus_max, n)
    dfv = dfu - rng.uniform(0.0, cfg.astigmatism, n)
    ang = rng.uniform(0.0, 180.0, n)
    subset = rng.integers(1, 3, n)

    n_junk = round(cfg.junk_fraction * n)
    junk_rows = np.sort(rng.choice(n, n_junk, replace=False)) if n_junk else np.empty(0, dtype=np.int64)
    kinds = np.resize(np.array([JUNK_KIND_CODES[k] for k in cfg.junk_kinds]), n_junk)
    junk_kind = np.zeros(n, dtype=np.int64)
    junk_kind[junk_rows] = rng.permutation(kinds)
    good = junk_kind == 0
    m = int(good.sum())

    state = np.full(n, -1, dtype=np.int64)
    coord = np.full(n, np.nan)
    volume = np.full(n, -1, dtype=np.int64)
    if cfg.heterogeneity == "continuous":
        c, comp = sample_coordinates(cfg, m, rng)
        coord[good] = c
        state[good] = comp
        volume[good] = np.rint(c * (cfg.n_gt - 1)).astype(np.int64)
    elif cfg.heterogeneity == "compositional":
        s = rng.choice(cfg.n_states, m, p=cfg.weights())
        state[good] = s
        volume[good] = s
    else:
        state[good] = 0
        volume[good] = 0
    return Particles(A, -disp, dfu, dfv, ang, subset, state, coord, volume, junk_kind)


# ---- rendering -------------------------------------------------------------------------------------

def _chunk_rows(D: int) -> int:
    """Images per render chunk: about a million slice samples (bounded memory at any box size)."""
    return max(8, (1 << 20) // (D * (D // 2 + 1)))


class _Moments:
    """Running Σx and Σx² (float64) of the clean particle images, for the exact whole-box SNR."""

    def __init__(self) -> None:
        self.count, self.s1, self.s2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        x = x.astype(np.float64, copy=False)
        self.count += x.size
        self.s1 += float(x.sum())
        self.s2 += float(np.square(x).sum())

    @property
    def mean(self) -> float:
        return self.s1 / self.count if self.count else 0.0

    @property
    def var(self) -> float:
        return max(self.s2 / self.count - self.mean**2, 0.0) if self.count else 0.0


def _render_rows(vol: np.ndarray, rows: np.ndarray, parts: Particles, ctf: np.ndarray, stack: np.ndarray,
                 cfg: SimConfig, bar: tqdm, moments: _Moments | None) -> None:
    """Render the images of `rows` from one volume into the memory-mapped stack, chunk by chunk."""
    import torch

    from drgn_core.projection import prepare_volume_ft, render_images

    vft = prepare_volume_ft(torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32)))
    step = _chunk_rows(cfg.D)
    for a in range(0, len(rows), step):
        r = rows[a : a + step]
        imgs = render_images(vft, torch.from_numpy(parts.A[r]).float(), torch.from_numpy(parts.origin_px[r]),
                             torch.from_numpy(ctf[r]).float()).numpy()
        stack[r] = imgs
        if moments is not None:
            moments.add(imgs)
        bar.update(len(r))


def _render_ice(rows: np.ndarray, ctf: np.ndarray, cfg: SimConfig, rng: np.random.Generator,
                signal_std: float) -> np.ndarray:
    """Ice-like junk: big soft blobs through the CTF, scaled to 1–3× the particles' signal std.

    The blobs reach past the box edge, as contamination on a micrograph does, so they are drawn and
    CTF-modulated on a 2D-wide canvas and the central D×D cut out: the CTF of a box-sized image would wrap
    the blobs' edges around the box and draw lines along them.
    """
    from drgn_core.ctf import ctf_from_params
    from drgn_core.fourier import fft2_center, ifft2_center, lattice_2d
    from drgn_core.phantoms import ice_blobs

    D, W = cfg.D, 2 * cfg.D
    o = W // 2 - D // 2
    blobs = np.stack([ice_blobs(W, rng, extent=D) for _ in rows])
    c = ctf_from_params(lattice_2d(W).reshape(-1, 2), ctf[rows]).reshape(len(rows), W, W)
    imgs = ifft2_center(fft2_center(blobs) * c).real[:, o : o + D, o : o + D]
    std = imgs.reshape(len(rows), -1).std(axis=1)
    gain = rng.uniform(1.0, 3.0, len(rows)) * signal_std / np.where(std > 0, std, 1.0)
    return (imgs * gain[:, None, None]).astype(np.float32)


def _decoy_volumes(cfg: SimConfig, n_atoms: int, seed: np.random.SeedSequence) -> list[np.ndarray]:
    """Maps of unrelated random objects (scaled down if needed to fit the box like the particles)."""
    from drgn_core.phantoms import random_phantom, render_density

    r_allow = _allowed_radius(cfg)
    vols = []
    for s in seed.spawn(N_DECOY_MODELS):
        model = random_phantom(n_atoms, np.random.default_rng(s))
        r = model.max_radius()
        if r > r_allow > 0:
            model = model.with_coords(model.coords * (r_allow / r))
        vols.append(render_density(model, cfg.D, cfg.apix, cfg.map_resolution))
    return vols


# ---- outputs ---------------------------------------------------------------------------------------

def _uids(n: int, seed: np.random.SeedSequence) -> list[str]:
    u = np.random.default_rng(seed).integers(1, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True)
    return [str(int(v)) for v in u]


def build_table(cfg: SimConfig, parts: Particles, uids: list[str]):
    """The canonical ParticleTable of the simulated stack (RELION labels + drgn location and GT columns)."""
    import pandas as pd

    from drgn_core.io.table import ParticleTable
    from drgn_core.pose import matrix_to_euler

    n = cfg.n
    eul = matrix_to_euler(parts.A)
    width = max(6, len(str(n)))
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnVoltage": [cfg.voltage_kv],
        "rlnSphericalAberration": [cfg.cs_mm], "rlnAmplitudeContrast": [cfg.amp_contrast],
        "rlnImagePixelSize": [cfg.apix], "rlnImageSize": [cfg.D], "rlnImageDimensionality": [2],
    })
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:0{width}d}@particles.mrcs" for i in range(n)],
        "rlnAngleRot": eul[:, 0], "rlnAngleTilt": eul[:, 1], "rlnAnglePsi": eul[:, 2],
        "rlnOriginXAngst": parts.origin_px[:, 0] * cfg.apix,
        "rlnOriginYAngst": parts.origin_px[:, 1] * cfg.apix,
        "rlnDefocusU": parts.defocus_u, "rlnDefocusV": parts.defocus_v,
        "rlnDefocusAngle": parts.defocus_angle,
        "rlnPhaseShift": np.zeros(n), "rlnCtfBfactor": np.full(n, cfg.bfactor),
        "rlnOpticsGroup": np.ones(n, dtype=np.int64), "rlnRandomSubset": parts.subset,
        "drgnStackPath": ["particles.mrcs"] * n, "drgnStackIndex": np.arange(n, dtype=np.int64),
        "drgnImageSign": np.ones(n, dtype=np.int64), "drgnSourceRow": np.arange(n, dtype=np.int64),
        "drgnUid": uids,
        "drgnGtState": parts.state, "drgnGtCoord": parts.coord,
        "drgnGtJunk": (parts.junk_kind > 0).astype(np.int64), "drgnGtVolume": parts.volume,
        "drgnGtJunkKind": parts.junk_kind,
    })
    return ParticleTable(particles, optics)


def _check_outdir(outdir: Path, cfg: SimConfig) -> None:
    """Refuse to replace a folder that is not a previous simulation, or one that holds the input model."""
    if outdir.exists() and not outdir.is_dir():
        raise DrgnError("exists and is not a folder; choose another output", outdir)
    if outdir.is_dir() and any(outdir.iterdir()) and not (outdir / "gt.json").exists():
        raise DrgnError("exists, is not empty and is not an earlier drgn simulate output (no gt.json); "
                        "refusing to replace it, choose a new folder", outdir)
    if cfg.model_path is not None:
        model = Path(cfg.model_path).resolve()
        if outdir.resolve() in model.parents:
            raise DrgnError("holds the input model, which replacing the folder would delete; choose another "
                            "output", outdir)


def _config_record(cfg: SimConfig, gt: GroundTruth) -> dict:
    d = asdict(cfg)
    d["junk_kinds"] = list(cfg.junk_kinds)
    d["state_weights"] = [float(w) for w in cfg.weights()] if cfg.heterogeneity == "compositional" else None
    d["resolution"] = cfg.map_resolution
    d["n_atoms"] = gt.n_atoms
    return d


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run torch on `n` intra-op threads inside the block, restoring the caller's setting after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_simulation(cfg: SimConfig, outdir: str | os.PathLike, progress: bool = True, threads: int = 1
                   ) -> dict:
    """Simulate the dataset described by `cfg` into `outdir` (replaced whole, atomically); returns gt.json.

    `threads` is the number of torch threads while rendering. The default, one, makes the output bytes
    independent of the machine (parallel reductions round differently with another thread count), and
    on a shared machine it is also the fastest: the work per call is small, so a second thread mostly
    waits for a core (20,000 images at D=64 took 13 s on one thread and 52 s on two, on a 2-core machine
    running other jobs).
    Raise it on an idle multi-core machine for speed; outputs stay deterministic for a fixed value.

    Example:
        run_simulation(SimConfig(n=2000, heterogeneity="compositional", junk_fraction=0.1), "sim")
    """
    with _torch_threads(threads):
        return _run(cfg, Path(outdir), progress)


def _run(cfg: SimConfig, outdir: Path, progress: bool) -> dict:
    import torch

    from drgn_core.io.atomic import atomic_dir
    from drgn_core.io.cs import write_cs
    from drgn_core.io.mrc import new_mmap_stack
    from drgn_core.io.star import write_relion_star
    from drgn_core.io.table import write_table
    from drgn_core.progress import progress_bar

    cfg.validate()
    _check_outdir(outdir, cfg)
    s_model, s_particles, s_junk, s_noise, s_uid = np.random.SeedSequence(cfg.seed).spawn(5)
    if cfg.model_seed is not None:  # the same child stream as --seed MODEL_SEED would give the object
        s_model = np.random.SeedSequence(cfg.model_seed).spawn(5)[0]
    gt = build_ground_truth(cfg, s_model)
    parts = draw_particles(cfg, np.random.default_rng(s_particles))
    ctf = parts.ctf_params(cfg)

    with atomic_dir(outdir) as tmp, torch.inference_mode():
        (tmp / "gt_volumes").mkdir()
        stack = new_mmap_stack(tmp / "particles.mrcs", cfg.n, cfg.D, cfg.apix)
        clean = new_mmap_stack(tmp / "clean.mrcs", cfg.n, cfg.D, cfg.apix) if cfg.write_clean else None
        try:
            with progress_bar(total=cfg.n, desc="simulate: render", unit="img", disable=not progress) as bar:
                moments = _render_particles(gt, parts, ctf, cfg, tmp / "gt_volumes", stack.data, bar)
                _render_junk(parts, ctf, cfg, gt.n_atoms, math.sqrt(moments.var), s_junk, stack.data, bar)
            noise_sigma = math.sqrt(moments.var / cfg.snr)
            noise_stats = _add_noise(stack, clean, noise_sigma, s_noise, progress)
        finally:
            stack.close()
            if clean is not None:
                clean.close()

        with open(tmp / "gt_volumes" / "coords.txt", "w") as f:
            for c, st in zip(gt.coords, gt.states):
                f.write(f"{c:.6f}\n" if cfg.heterogeneity == "continuous" else f"{int(st)}\n")
        table = build_table(cfg, parts, _uids(cfg.n, s_uid))
        write_table(table, tmp / "table.star", source_path="drgn simulate", source_format="simulated",
                    seed=cfg.seed)
        write_relion_star(table, tmp / "particles.star")
        write_cs(table, tmp / "particles.cs", seed=cfg.seed)
        summary = _summary(cfg, gt, parts, moments, noise_sigma, noise_stats)
        with open(tmp / "gt.json", "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
    return summary


def _render_particles(gt: GroundTruth, parts: Particles, ctf: np.ndarray, cfg: SimConfig, vol_dir: Path,
                      stack: np.ndarray, bar: tqdm) -> _Moments:
    """Each ground-truth map in turn: write it, render its particles; returns the clean-signal moments."""
    from drgn_core.io.mrc import write_mrc

    moments = _Moments()
    for j in range(len(gt.coords)):
        vol = gt.render(j)
        write_mrc(vol_dir / f"vol_{j:03d}.mrc", vol, cfg.apix)
        _render_rows(vol, np.flatnonzero(parts.volume == j), parts, ctf, stack, cfg, bar, moments)
    if moments.count == 0:
        raise DrgnError("no particle images to simulate (every row is junk); lower --junk-fraction")
    return moments


def _render_junk(parts: Particles, ctf: np.ndarray, cfg: SimConfig, n_atoms: int, signal_std: float,
                 seed: np.random.SeedSequence, stack: np.ndarray, bar: tqdm) -> None:
    """Junk rows: pure noise (left blank here), decoy objects, and ice blobs scaled to the signal."""
    rng = np.random.default_rng(seed)
    noise_rows = np.flatnonzero(parts.junk_kind == JUNK_KIND_CODES["noise"])
    stack[noise_rows] = 0.0
    bar.update(len(noise_rows))
    decoy_rows = np.flatnonzero(parts.junk_kind == JUNK_KIND_CODES["decoy"])
    if len(decoy_rows):
        vols = _decoy_volumes(cfg, n_atoms, seed.spawn(1)[0])
        which = rng.integers(0, len(vols), len(decoy_rows))
        for k, vol in enumerate(vols):
            _render_rows(vol, decoy_rows[which == k], parts, ctf, stack, cfg, bar, None)
    ice_rows = np.flatnonzero(parts.junk_kind == JUNK_KIND_CODES["ice"])
    for a in range(0, len(ice_rows), 256):
        r = ice_rows[a : a + 256]
        stack[r] = _render_ice(r, ctf, cfg, rng, signal_std)
        bar.update(len(r))


def _add_noise(stack: MrcFile, clean: MrcFile | None, sigma: float, seed: np.random.SeedSequence,
               progress: bool) -> dict:
    """Second pass: add white Gaussian noise of std `sigma` in place, block by block; set header stats."""
    from drgn_core.progress import progress_bar

    n, D = stack.data.shape[0], stack.data.shape[-1]
    blocks = range(0, n, NOISE_BLOCK)
    seeds = seed.spawn(len(blocks))
    lo, hi, s1, s2, e2, count = math.inf, -math.inf, 0.0, 0.0, 0.0, 0
    with progress_bar(total=n, desc="simulate: noise", unit="img", disable=not progress) as bar:
        for a, s in zip(blocks, seeds):
            b = min(n, a + NOISE_BLOCK)
            x = np.array(stack.data[a:b], dtype=np.float32)
            if clean is not None:
                clean.data[a:b] = x
            noise = np.random.default_rng(s).standard_normal((b - a, D, D), dtype=np.float32)
            noise *= np.float32(sigma)
            x += noise
            stack.data[a:b] = x
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
            x64 = x.astype(np.float64)
            s1 += float(x64.sum())
            s2 += float(np.square(x64).sum())
            e2 += float(np.square(noise.astype(np.float64)).sum())
            count += x.size
            bar.update(b - a)
    mean = s1 / count
    h = stack.header
    h.dmin, h.dmax, h.dmean = lo, hi, mean
    h.rms = math.sqrt(max(s2 / count - mean**2, 0.0))
    return {"noise_var_realised": e2 / count}


def _summary(cfg: SimConfig, gt: GroundTruth, parts: Particles, moments: _Moments, noise_sigma: float,
             noise_stats: dict) -> dict:
    kinds = {k: int((parts.junk_kind == code).sum()) for k, code in JUNK_KIND_CODES.items() if code}
    good = parts.junk_kind == 0
    states, counts = np.unique(parts.state[good], return_counts=True)
    vol_counts = np.bincount(parts.volume[good], minlength=len(gt.coords))
    files = [f"gt_volumes/vol_{j:03d}.mrc" for j in range(len(gt.coords))]
    return {
        "drgnflow_version": __version__,
        "config": _config_record(cfg, gt),
        "snr": cfg.snr,
        "snr_definition": "variance of all pixels of the clean particle images (junk excluded) / "
                          "noise variance",
        "signal_mean": moments.mean,
        "signal_var": moments.var,
        "noise_sigma": noise_sigma,
        "snr_realised": moments.var / noise_stats["noise_var_realised"],
        "n": cfg.n,
        "n_particles": int(good.sum()),
        "n_junk": int((~good).sum()),
        "junk_counts": kinds,
        "junk_kind_codes": JUNK_KIND_CODES,
        "state_counts": {str(int(s)): int(c) for s, c in zip(states, counts)},
        "heterogeneity": cfg.heterogeneity,
        "state_definition": STATE_DEFINITIONS[cfg.heterogeneity],
        "distribution": cfg.distribution if cfg.heterogeneity == "continuous" else None,
        "volumes": {"files": files, "coords": [None if np.isnan(c) else float(c) for c in gt.coords],
                    "states": [int(s) for s in gt.states], "counts": [int(c) for c in vol_counts]},
        "hinge": gt.hinge.to_dict() if gt.hinge is not None else None,
        "model": {"source": gt.source, "n_atoms": gt.n_atoms, "domains": list(gt.model.domain_names),
                  "resolution_A": cfg.map_resolution},
        "ctf_note": "rlnCtfBfactor holds the simulated B-factor envelope, exp(-B s²/4), part of the CTF",
        "files": {"table": "table.star", "stack": "particles.mrcs", "relion": "particles.star",
                  "cryosparc": "particles.cs", "volumes": "gt_volumes", "clean": "clean.mrcs"
                  if cfg.write_clean else None},
    }
