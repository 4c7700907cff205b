"""Particle poses, in RELION's convention, and conversions from the other tools' conventions.

Convention (docs/architecture.md § Poses): the pose of particle n is the 3×3 rotation matrix

    A = Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True).as_matrix().T

exactly as RELION builds it from rlnAngleRot/Tilt/Psi. The image is the projection of the volume
rotated by A: its central slice samples the volume's 3D Fourier transform at Aᵀ·(kx, ky, 0), and in
real space P(x, y) = Σ_z V(Aᵀ·(x, y, z)).

cryoSPARC stores `alignments3D/pose` as a rotation vector r with A = Rotation.from_rotvec(r).as_matrix().T.

Shifts are kept in Ångström with the sign of RELION's rlnOriginX/YAngst: the translation that re-centres
the particle, applied to an image's transform as exp(-2πi k·t) with k in cycles/px and t in px.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.spatial.transform import Rotation


def euler_to_matrix(euler_deg: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) in degrees, shape (..., 3) → pose matrices A, shape (..., 3, 3)."""
    e = np.asarray(euler_deg, dtype=np.float64)
    flat = e.reshape(-1, 3)
    A = Rotation.from_euler("ZYZ", flat, degrees=True).as_matrix().transpose(0, 2, 1)
    return A.reshape(*e.shape[:-1], 3, 3)


def matrix_to_euler(A: np.ndarray) -> np.ndarray:
    """Pose matrices A (..., 3, 3) → RELION (rot, tilt, psi) in degrees, tilt in [0, 180].

    At tilt 0 or 180 only rot ± psi is defined; scipy then sets psi = 0 and warns ("Gimbal lock"). The
    angles it returns still rebuild A exactly, so the warning is silenced: identity poses are common
    (test data, exports of unaligned particles) and are not a problem to report.
    """
    A = np.asarray(A, dtype=np.float64)
    flat = A.reshape(-1, 3, 3).transpose(0, 2, 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Gimbal lock detected", category=UserWarning)
        e = Rotation.from_matrix(flat).as_euler("ZYZ", degrees=True)
    return e.reshape(*A.shape[:-2], 3)


def rotvec_to_matrix(rotvec: np.ndarray) -> np.ndarray:
    """cryoSPARC `alignments3D/pose` rotation vectors (..., 3), radians → pose matrices A (..., 3, 3)."""
    r = np.asarray(rotvec, dtype=np.float64)
    A = Rotation.from_rotvec(r.reshape(-1, 3)).as_matrix().transpose(0, 2, 1)
    return A.reshape(*r.shape[:-1], 3, 3)


def matrix_to_rotvec(A: np.ndarray) -> np.ndarray:
    """Pose matrices A (..., 3, 3) → cryoSPARC rotation vectors (..., 3) in radians."""
    A = np.asarray(A, dtype=np.float64)
    r = Rotation.from_matrix(A.reshape(-1, 3, 3).transpose(0, 2, 1)).as_rotvec()
    return r.reshape(*A.shape[:-2], 3)


def random_poses(n: int, rng: np.random.Generator) -> np.ndarray:
    """n poses drawn uniformly from SO(3) (Haar measure), as matrices A (n, 3, 3)."""
    return Rotation.random(n, random_state=rng).as_matrix()
