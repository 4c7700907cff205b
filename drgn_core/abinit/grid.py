"""Rotation grids for the ab initio pose search: a near-uniform base grid on SO(3) and local refinement.

Base grid. `base_grid(n)` is the super-Fibonacci spiral of Alexa (CVPR 2022, "Super-Fibonacci Spirals:
Fast, Low-Discrepancy Sampling of SO(3)"): n unit quaternions q_i built from two irrational winding
numbers (√2 and the root ψ of ψ⁴ = ψ + 4), deterministic, with a discrepancy as low as the best
HEALPix-based grids and any n (not only 72·8^level). No dependency and no stored tables; a test checks
its covering (nearest-neighbour angles) against the analytic spacing of a uniform grid.

For n points the mean spacing is about `grid_spacing(n)` = 2·(3π / 4n)^(1/3) rad (each point owns
π²/n of SO(3)'s volume π² in the quaternion metric, a ball of rotation angle θ having volume
(4/3)·π·(θ/2)³): 4608 points (cryoDRGN's base HEALPix level 2 × 24 in-plane angles) → 9.2°.

Local refinement. `local_offsets(step)` are the 27 rotations exp(step·v), v ∈ {-1, 0, 1}³ (identity
included): composed with a candidate pose they cover a cube of ±step around it in the axis-angle chart.
Halving the step at each level gives a hierarchical search around the best poses that ends near
step/2^levels, like the children of a HEALPix cell but for any base grid.

Rotations are handled as pose matrices A (docs/architecture.md § Poses); the grids are symmetric
under inversion A ↦ Aᵀ in distribution, so treating them as poses or their inverses is the same grid.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial.transform import Rotation

PHI = math.sqrt(2.0)
PSI = 1.533751168755204288118041  # the real root of ψ⁴ = ψ + 4 (Alexa 2022)


def grid_spacing(n: int) -> float:
    """Mean angular spacing (rad) of n near-uniform rotations: 2·(3π/4n)^(1/3)."""
    return 2.0 * (3.0 * math.pi / (4.0 * n)) ** (1.0 / 3.0)


def base_grid(n: int) -> np.ndarray:
    """n near-uniform rotations of SO(3) (super-Fibonacci spiral) as matrices (n, 3, 3) float64."""
    if n < 1:
        raise ValueError(f"a rotation grid needs at least one point, got {n}")
    i = np.arange(n, dtype=np.float64) + 0.5
    s = i / n
    r = np.sqrt(s)
    R = np.sqrt(1.0 - s)
    alpha = 2.0 * math.pi * i / PHI
    beta = 2.0 * math.pi * i / PSI
    q = np.stack([r * np.sin(alpha), r * np.cos(alpha), R * np.sin(beta), R * np.cos(beta)], axis=-1)
    return Rotation.from_quat(q).as_matrix()  # scipy's (x, y, z, w) order; any order is uniform here


def local_offsets(step: float) -> np.ndarray:
    """The 27 rotations exp(step·v), v ∈ {-1, 0, 1}³ (index 13 is the identity), as (27, 3, 3)."""
    v = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij"), axis=-1).reshape(-1, 3)
    return Rotation.from_rotvec(v * float(step)).as_matrix()


def shift_grid(extent: float, n: int) -> np.ndarray:
    """n × n shifts (px) on a square grid spanning [-extent, extent] per axis, (n², 2) in (x, y)."""
    if n == 1:
        return np.zeros((1, 2))
    g = np.linspace(-extent, extent, n)
    X, Y = np.meshgrid(g, g, indexing="xy")
    return np.stack([X.ravel(), Y.ravel()], axis=-1)


def local_shifts(step: float) -> np.ndarray:
    """The 9 shift offsets step·{-1, 0, 1}² (px), index 4 is zero."""
    return shift_grid(step, 3)


def rotation_angle(A: torch.Tensor | np.ndarray, B: torch.Tensor | np.ndarray) -> np.ndarray:
    """Angle (degrees) of the rotation taking B to A, for stacks (…, 3, 3): arccos((tr(A Bᵀ) - 1)/2)."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    tr = np.einsum("...ij,...ij->...", A, B)
    return np.degrees(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


def so3_exp(v: torch.Tensor) -> torch.Tensor:
    """Differentiable exp map: axis-angle vectors (…, 3) → rotation matrices (…, 3, 3) (Rodrigues).

    The Taylor form near zero keeps the gradient finite at v = 0, where pose refinement starts.
    """
    theta2 = (v * v).sum(-1, keepdim=True)[..., None]          # (…, 1, 1)
    theta = torch.sqrt(theta2.clamp_min(1e-12))
    small = theta2 < 1e-8
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp_min(1e-12))
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    zero = torch.zeros_like(x)
    K = torch.stack([torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1),
                     torch.stack([-y, x, zero], -1)], -2)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(K)
    return eye + a * K + b * (K @ K)
