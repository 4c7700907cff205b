"""Pose conventions: RELION Euler angles ↔ matrices ↔ cryoSPARC rotation vectors, pinned by numbers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from drgn_core.pose import euler_to_matrix, matrix_to_euler, matrix_to_rotvec, random_poses, rotvec_to_matrix


def relion_euler_matrix(rot: float, tilt: float, psi: float) -> np.ndarray:
    """RELION's Euler_angles2matrix (src/euler.cpp), written out entry by entry from its formula."""
    a, b, g = (math.radians(v) for v in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(g), math.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ])


def test_euler_to_matrix_is_relions_matrix():
    rng = np.random.default_rng(1)
    eul = np.column_stack([rng.uniform(-180, 180, 20), rng.uniform(0, 180, 20), rng.uniform(-180, 180, 20)])
    ours = euler_to_matrix(eul)
    ref = np.stack([relion_euler_matrix(*e) for e in eul])
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_a_pure_rot_of_90_degrees_maps_x_to_minus_y():
    # A = R_z(rot)ᵀ: the volume's +x axis lands on the image's -y axis for rot = 90°.
    A = euler_to_matrix(np.array([90.0, 0.0, 0.0]))
    np.testing.assert_allclose(A @ [1.0, 0.0, 0.0], [0.0, -1.0, 0.0], atol=1e-12)
    # tilt = 90° about y: the volume's z axis (the viewing axis at tilt 0) lands on the image's -x axis,
    # A e_z = (-sin θ, 0, cos θ), RELION's third column (-cψ sθ, sψ sθ, cθ) at ψ = 0.
    A = euler_to_matrix(np.array([0.0, 90.0, 0.0]))
    np.testing.assert_allclose(A @ [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], atol=1e-12)


def test_matrix_euler_round_trip_random_poses():
    A = random_poses(500, np.random.default_rng(0))
    e = matrix_to_euler(A)
    assert np.all((e[:, 1] >= 0) & (e[:, 1] <= 180))
    np.testing.assert_allclose(euler_to_matrix(e), A, atol=1e-10)
    np.testing.assert_allclose(matrix_to_euler(euler_to_matrix(e)), e, atol=1e-7)


@pytest.mark.parametrize("tilt", [0.0, 1e-7, 1e-3, 179.999, 180.0 - 1e-7, 180.0])
def test_round_trip_near_gimbal_lock_rebuilds_the_matrix_without_warning(tilt):
    A = euler_to_matrix(np.array([[37.0, tilt, -112.0], [-170.0, tilt, 15.0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's "Gimbal lock detected" must not reach users
        e = matrix_to_euler(A)
    # within scipy's gimbal-lock threshold (tilts below ~1e-6°) psi is set to 0: entries of size sin(tilt)
    # ≈ 2e-9 are then rebuilt only to that size, which is far below any meaningful angle
    np.testing.assert_allclose(euler_to_matrix(e), A, atol=1e-8)
    assert 0.0 <= e[0, 1] <= 180.0


def test_rotvec_round_trip_and_cryosparc_convention():
    A = random_poses(300, np.random.default_rng(2))
    r = matrix_to_rotvec(A)
    np.testing.assert_allclose(rotvec_to_matrix(r), A, atol=1e-10)
    # cryoSPARC: A = Rotation.from_rotvec(pose).as_matrix().T; e.g. a 90° turn about z
    A = rotvec_to_matrix(np.array([0.0, 0.0, math.pi / 2]))
    np.testing.assert_allclose(A, Rotation.from_rotvec([0, 0, math.pi / 2]).as_matrix().T, atol=1e-15)
    np.testing.assert_allclose(A @ [1.0, 0.0, 0.0], [0.0, -1.0, 0.0], atol=1e-12)


def test_euler_rotvec_agree():
    """The same pose through both conventions: RELION angles → A → rotvec → A."""
    eul = np.array([[10.0, 20.0, 30.0], [-150.0, 170.0, 60.0], [0.0, 90.0, 0.0]])
    A = euler_to_matrix(eul)
    np.testing.assert_allclose(rotvec_to_matrix(matrix_to_rotvec(A)), A, atol=1e-12)
    # cryoSPARC's pose is the rotation vector of Aᵀ = R(rot, tilt, psi): tilt 90° is +π/2 about y
    np.testing.assert_allclose(matrix_to_rotvec(A[2]), [0.0, math.pi / 2, 0.0], atol=1e-12)


def test_random_poses_are_uniform_and_seeded():
    A = random_poses(20000, np.random.default_rng(3))
    eye = np.broadcast_to(np.eye(3), A.shape)
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", A, A), eye, atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(A), 1.0, atol=1e-12)
    # Haar measure: E[A] = 0, and the viewing direction's cos(tilt) = A[2, 2] is uniform on [-1, 1]
    assert np.abs(A.mean(axis=0)).max() < 0.02
    hist, _ = np.histogram(A[:, 2, 2], bins=10, range=(-1, 1))
    assert hist.min() > 0.9 * 2000 and hist.max() < 1.1 * 2000
    again = random_poses(5, np.random.default_rng(7))
    np.testing.assert_array_equal(random_poses(5, np.random.default_rng(7)), again)
