"""Small synthetic particle sets for the training tests, made independently of drgn_core's simulator.

Objects are sums of 3D Gaussian blobs, whose continuous Fourier transform is known in closed form:
a blob a·exp(-|x - c|²/2s²) has transform a·(2πs²)^{3/2}·exp(-2π²s²|q|²)·exp(-2πi q·c). An image of pose A
is then exact, with no interpolation: its centred transform is that function at q = Aᵀ(kx, ky, 0), times the
shift phase and the CTF (docs/architecture.md § Shifts, § CTF). Using a closed form rather than any projector
of ours keeps these tests independent of the code under test.

Ground truth kept per particle: drgnGtCoord (hinge angle fraction c ∈ [0, 1]), drgnGtState, drgnGtVolume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from drgn_core.ctf import ctf_from_params
from drgn_core.fourier import ifft2_center, lattice_2d, lattice_3d
from drgn_core.io.mrc import write_mrc
from drgn_core.io.table import ParticleTable, write_table
from drgn_core.pose import matrix_to_euler


@dataclass
class Blobs:
    """Gaussian blobs: centres (n, 3) px as (x, y, z) from the box centre, amplitudes (n,), widths (n,) px."""

    centres: np.ndarray
    amps: np.ndarray
    widths: np.ndarray

    def ft(self, q: np.ndarray) -> np.ndarray:
        """Continuous transform at q (..., 3) cycles/px → complex (...)."""
        out = np.zeros(q.shape[:-1], dtype=np.complex128)
        q2 = (q**2).sum(-1)
        for c, a, s in zip(self.centres, self.amps, self.widths):
            envelope = a * (2 * np.pi * s**2) ** 1.5 * np.exp(-2 * np.pi**2 * s**2 * q2)
            out += envelope * np.exp(-2j * np.pi * q @ c)
        return out

    def volume(self, D: int) -> np.ndarray:
        """Real-space density on a D³ grid, [z, y, x], origin at index D//2."""
        x = lattice_3d(D) * D  # (D, D, D, 3) voxel offsets (x, y, z) from the centre
        vol = np.zeros((D, D, D))
        for c, a, s in zip(self.centres, self.amps, self.widths):
            vol += a * np.exp(-((x - c) ** 2).sum(-1) / (2 * s**2))
        return vol.astype(np.float32)


def make_object(rng: np.random.Generator, n: int, spread: float, offset=(0.0, 0.0, 0.0),
                width=(1.6, 2.4)) -> Blobs:
    centres = rng.normal(size=(n, 3)) * spread + np.asarray(offset)
    return Blobs(centres, rng.uniform(0.6, 1.0, n), rng.uniform(*width, n))


def concat(*parts: Blobs) -> Blobs:
    return Blobs(np.concatenate([p.centres for p in parts]), np.concatenate([p.amps for p in parts]),
                 np.concatenate([p.widths for p in parts]))


def hinge(core: Blobs, arm: Blobs, angle: float, axis=(0.0, 0.0, 1.0), pivot=(0.0, 0.0, 0.0)) -> Blobs:
    """The arm rotated by `angle` rad about an axis through `pivot`, joined to the core."""
    R = Rotation.from_rotvec(np.asarray(axis) * angle).as_matrix()
    moved = Blobs((arm.centres - pivot) @ R.T + pivot, arm.amps, arm.widths)
    return concat(core, moved)


HINGE_AXIS = tuple(np.array([0.0, 0.3, 1.0]) / np.linalg.norm([0.0, 0.3, 1.0]))


def parts(D: int) -> tuple[Blobs, Blobs, Blobs, np.ndarray]:
    """A fixed, chiral test object scaled to the box: a compact body, a rod-shaped arm hinged on it, and a
    detachable lump; and the hinge point. Fixed rather than random so every test sees the same object."""
    s = D / 32
    body = np.array([[-4, 0, 0], [-4, 3, 0], [-4, -3, 0], [-1, 0, 2], [-1, 0, -2], [-6, 2, 2], [-2, -3, -2]])
    rod = np.array([[1, 0, 0], [3.5, 0, 0], [6, 0, 0], [8.5, 0.5, 0]])
    lump = np.array([[-1, 6, 3], [-3, 7, 2], [0, 7, 5]])

    def blobs(c: np.ndarray, width: float) -> Blobs:
        return Blobs(c * s, np.ones(len(c)), np.full(len(c), width * s))

    return blobs(body, 2.0), blobs(rod, 1.6), blobs(lump, 1.8), np.array([-0.5, 0.0, 0.0]) * s


@dataclass
class Dataset:
    table: Path
    stack: Path
    gt_coord: np.ndarray
    gt_state: np.ndarray
    volumes: list[np.ndarray]  # ground-truth densities (D³), one per state / hinge bin
    A: np.ndarray
    apix: float


def render(outdir: Path, n: int, D: int, kind: str = "none", snr: float = 1.0, apix: float = 5.0,
           seed: int = 0, n_bins: int = 20, max_shift: float = 2.0, phantom: str = "blobs") -> Dataset:
    """Write table.star + particles.mrcs (box D, at the table's own pixel size, no sidecar).

    kind: 'none' (one object), 'continuous' (hinge, c uniform in [0, 1], 1.5 rad range, rendered from
    n_bins maps like the paper), 'compositional' (3 states: core, core+A, core+A+B; populations .2/.3/.5).
    phantom: 'blobs' (random blobs drawn from `seed`: a body, an arm, a lump) or 'fixed' (`parts`).
    """
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if phantom == "blobs":
        r = D / 12
        core = make_object(rng, 10, r, offset=(-r, 0, 0))
        arm = make_object(rng, 6, r * 0.6, offset=(2.0 * r, 0, 0))
        extra = make_object(rng, 5, r * 0.5, offset=(0, 2.0 * r, r))
        pivot, axis = np.array([0.5 * r, 0, 0]), (0.0, 1.0, 0.0)
        angles = 1.5 * (np.arange(n_bins) + 0.5) / n_bins
    else:
        core, arm, extra, pivot = parts(D)
        axis, angles = HINGE_AXIS, 1.5 * ((np.arange(n_bins) + 0.5) / n_bins - 0.5)
    if kind == "none":
        objects = [concat(core, arm)]
        vol_id = np.zeros(n, dtype=int)
        coord = np.full(n, np.nan)
        state = np.zeros(n, dtype=int)
    elif kind == "continuous":
        coord = rng.uniform(0, 1, n)
        vol_id = np.minimum((coord * n_bins).astype(int), n_bins - 1)
        objects = [hinge(core, arm, a, axis=axis, pivot=pivot) for a in angles]
        state = np.zeros(n, dtype=int)
    elif kind == "compositional":
        state = rng.choice(3, size=n, p=[0.2, 0.3, 0.5])
        objects = [core, concat(core, arm), concat(core, arm, extra)]
        vol_id, coord = state.copy(), np.full(n, np.nan)
    else:
        raise ValueError(kind)

    A = Rotation.random(n, random_state=rng).as_matrix().transpose(0, 2, 1)  # A = Rᵀ, any uniform rotation
    disp = rng.uniform(-max_shift, max_shift, size=(n, 2))                   # particle displaced by +d px
    dfu = rng.uniform(8000, 20000, n)
    dfv = dfu - rng.uniform(0, 500, n)
    ang = rng.uniform(0, 180, n)
    params = np.stack([np.full(n, apix), dfu, dfv, ang, np.full(n, 300.0), np.full(n, 2.7),
                       np.full(n, 0.1), np.zeros(n), np.zeros(n)], axis=1)
    k2 = lattice_2d(D).reshape(-1, 2)                         # (D², 2) (kx, ky)
    k3 = np.concatenate([k2, np.zeros((len(k2), 1))], axis=1)  # (D², 3)
    images = np.empty((n, D, D), dtype=np.float32)
    for a in range(0, n, 256):
        sl = slice(a, min(a + 256, n))
        q = np.einsum("pi,nij->npj", k3, A[sl])              # q = Aᵀk: q_j = Σ_i k_i A_ij
        F = np.empty(q.shape[:2], dtype=np.complex128)
        for i, vi in enumerate(vol_id[sl]):
            F[i] = objects[vi].ft(q[i])
        F *= np.exp(-2j * np.pi * disp[sl] @ k2.T)              # displacement by +d
        F *= ctf_from_params(k2, params[sl])
        images[sl] = ifft2_center(F.reshape(-1, D, D)).real
    noise_sd = np.sqrt(images.var() / snr)
    images += rng.normal(scale=noise_sd, size=images.shape).astype(np.float32)

    stack = outdir / "particles.mrcs"
    write_mrc(stack, images, apix, stack=True)
    euler = matrix_to_euler(A)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
        "rlnAngleRot": euler[:, 0], "rlnAngleTilt": euler[:, 1], "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": -disp[:, 0] * apix, "rlnOriginYAngst": -disp[:, 1] * apix,  # re-centring origin
        "rlnDefocusU": dfu, "rlnDefocusV": dfv, "rlnDefocusAngle": ang, "rlnPhaseShift": 0.0,
        "rlnOpticsGroup": 1, "drgnStackPath": "particles.mrcs", "drgnStackIndex": np.arange(n),
        "drgnImageSign": 1, "drgnGtState": state, "drgnGtCoord": coord, "drgnGtJunk": 0,
        "drgnGtVolume": vol_id,
    })
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [apix], "rlnImageSize": [D]})
    table = outdir / "table.star"
    write_table(ParticleTable(particles, optics), table, source="tests/conftest_train.py")
    return Dataset(table, stack, coord, state, [o.volume(D) for o in objects], A, apix)


def sample_ft(F: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a centred 3D transform F [z, y, x] (box n) at q (..., 3) cycles/px of n."""
    from scipy.ndimage import map_coordinates

    n = F.shape[-1]
    idx = q * n + n // 2                                 # (..., 3) as (x, y, z) voxel indices
    coords = np.stack([idx[..., 2], idx[..., 1], idx[..., 0]]).reshape(3, -1)
    re = map_coordinates(F.real, coords, order=1, mode="constant")
    im = map_coordinates(F.imag, coords, order=1, mode="constant")
    return (re + 1j * im).reshape(q.shape[:-1])


def complex_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Re⟨a, b⟩ / (‖a‖‖b‖): 1 only when the two agree in amplitude pattern and phase."""
    a, b = np.ravel(a), np.ravel(b)
    return float(np.real(np.vdot(b, a)) / (np.linalg.norm(a) * np.linalg.norm(b)))


# The tiny training set and network of the `drgn train` option tests (test_train, test_schedule,
# test_curriculum). --device cpu: what those tests promise (bit-identical resume) is a CPU promise, also
# on a GPU machine.
TINY_TRAIN = ["--zdim", "1", "--enc-dim", "32", "--enc-layers", "1", "--dec-dim", "32", "--dec-layers", "1",
              "--threads", "1", "--lr", "1e-3", "--device", "cpu"]


def render_tiny(outdir: Path) -> Dataset:
    """240 images of the continuous hinge at D 16 (SNR 1): enough for a few fast training epochs."""
    return render(outdir, n=240, D=16, kind="continuous", snr=1.0, apix=8.0, seed=3)
