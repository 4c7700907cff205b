"""The contrast transfer function, with RELION's formula and sign (DESIGN §3).

    λ = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))            Å, V in volts
    Δ(θ) = -[(U + V)/2 + (U - V)/2 · cos 2(θ - θ_ast)]        Å, underfocus positive in U, V
    γ = π λ Δ s² + (π/2) Cs λ³ s⁴ - φ - atan(w / sqrt(1 - w²))
    CTF = -sin γ · exp(-B s² / 4)

s is the spatial frequency in Å⁻¹ (s = k / apix with k in cycles/px), θ its angle from the x axis,
Cs in mm (× 1e7 → Å), φ the phase shift, w the amplitude contrast. At s → 0 the CTF tends to +w, so
protein stays bright after multiplication (images are white-on-black, DESIGN §3).

cryoSPARC stores `ctf/df1_A`, `ctf/df2_A` (= U, V), `ctf/df_angle_rad` and `ctf/phase_shift_rad` in radians:
convert to degrees on import; here angles are degrees.

`compute_ctf` works on numpy arrays and torch tensors alike (vectorised over a batch of particles), so the
simulator, the back-projector and the training loss use one function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

Array = np.ndarray | torch.Tensor

# Columns of the (N, 9) CTF parameter array used throughout: `ParticleTable.ctf_params()` returns it.
CTF_COLUMNS = ("apix", "defocus_u", "defocus_v", "defocus_angle_deg", "voltage_kv", "cs_mm",
               "amp_contrast", "phase_shift_deg", "bfactor")


def electron_wavelength(voltage_kv: Array | float) -> Array | float:
    """Relativistic electron wavelength in Å for an accelerating voltage in kV."""
    v = voltage_kv * 1e3
    if isinstance(v, torch.Tensor):
        return 12.2643247 / torch.sqrt(v * (1 + 0.978466e-6 * v))
    return 12.2643247 / np.sqrt(v * (1 + 0.978466e-6 * v))


def compute_ctf(
    freqs: Array,
    defocus_u: Array | float,
    defocus_v: Array | float,
    defocus_angle_deg: Array | float,
    voltage_kv: Array | float,
    cs_mm: Array | float,
    amp_contrast: Array | float,
    phase_shift_deg: Array | float = 0.0,
    bfactor: Array | float = 0.0,
) -> Array:
    """CTF values at spatial frequencies `freqs` (..., P, 2) = (sx, sy) in Å⁻¹.

    Per-particle parameters broadcast against the leading dimensions of `freqs`: pass shape (N, 1) for a
    batch of N particles with `freqs` of shape (P, 2) or (N, P, 2); the result has shape (..., P).
    """
    torch_mode = isinstance(freqs, torch.Tensor)
    lib = torch if torch_mode else np

    def as_arr(x):
        if torch_mode:
            return torch.as_tensor(x, dtype=freqs.dtype, device=freqs.device)
        return np.asarray(x, dtype=np.float64)

    sx, sy = freqs[..., 0], freqs[..., 1]
    dfu, dfv, ang = as_arr(defocus_u), as_arr(defocus_v), as_arr(defocus_angle_deg)
    kv, cs, w = as_arr(voltage_kv), as_arr(cs_mm), as_arr(amp_contrast)
    phase, b = as_arr(phase_shift_deg), as_arr(bfactor)

    lam = electron_wavelength(kv)
    s2 = sx**2 + sy**2
    theta = lib.arctan2(sy, sx) if not torch_mode else torch.atan2(sy, sx)
    ang_rad = ang * (math.pi / 180)
    defocus = -(0.5 * (dfu + dfv) + 0.5 * (dfu - dfv) * lib.cos(2 * (theta - ang_rad)))
    gamma = (
        math.pi * lam * defocus * s2
        + 0.5 * math.pi * (cs * 1e7) * lam**3 * s2**2
        - phase * (math.pi / 180)
        - lib.arctan(w / lib.sqrt(1 - w**2))
    )
    ctf = -lib.sin(gamma)
    if torch_mode or np.any(b != 0):
        ctf = ctf * lib.exp(-b * s2 / 4)
    return ctf


def ctf_from_params(freqs_cpx: Array, params: Array) -> Array:
    """CTF for a batch from the (N, 9) parameter array (`CTF_COLUMNS`) and a lattice in cycles/px.

    `freqs_cpx` (P, 2) holds (kx, ky) in cycles/pixel of the current box; each particle's pixel size
    (column 0) converts them to Å⁻¹. Returns (N, P).
    """
    p = params
    apix = p[:, 0:1]
    freqs = freqs_cpx[None, :, :] / apix[:, :, None]
    cols = [p[:, i : i + 1] for i in range(1, 9)]
    return compute_ctf(freqs, *cols)


@dataclass(frozen=True)
class CTFParams:
    """One particle's CTF parameters, units in the names (for readability at call sites and in tests)."""

    defocus_u_A: float
    defocus_v_A: float
    defocus_angle_deg: float
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amp_contrast: float = 0.1
    phase_shift_deg: float = 0.0
    bfactor_A2: float = 0.0

    def __call__(self, freqs: Array) -> Array:
        return compute_ctf(freqs, self.defocus_u_A, self.defocus_v_A, self.defocus_angle_deg,
                           self.voltage_kv, self.cs_mm, self.amp_contrast, self.phase_shift_deg,
                           self.bfactor_A2)
