"""The contrast transfer function, with RELION's formula and sign (docs/architecture.md § CTF).

    λ = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))            Å, V in volts
    Δ(θ) = -[(U + V)/2 + (U - V)/2 · cos 2(θ - θ_ast)]        Å, underfocus positive in U, V
    γ = π λ Δ s² + (π/2) Cs λ³ s⁴ - φ - atan(w / sqrt(1 - w²))
    CTF = -sin γ · exp(-B s² / 4)

s is the spatial frequency in Å⁻¹ (s = k / apix with k in cycles/px), θ its angle from the x axis,
Cs in mm (× 1e7 → Å), φ the phase shift, w the amplitude contrast. At s → 0 the CTF tends to +w, so
protein stays bright after multiplication (images are white-on-black, docs/architecture.md § Images and
contrast).

cryoSPARC stores `ctf/df1_A`, `ctf/df2_A` (= U, V), `ctf/df_angle_rad` and `ctf/phase_shift_rad` in radians:
convert to degrees on import; here angles are degrees.

`compute_ctf` works on numpy arrays and torch tensors alike (vectorised over a batch of particles), so the
simulator, the back-projector and the training loss use one function.
"""

from __future__ import annotations

import math

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


def _angular_terms(sx: Array, sy: Array) -> tuple[Array, Array, Array]:
    """s², cos 2θ and sin 2θ of frequencies (sx, sy), θ their angle from the x axis (θ = 0 at s = 0).

    With these, cos 2(θ - θ_ast) = cos 2θ · cos 2θ_ast + sin 2θ · sin 2θ_ast needs no per-pixel atan2 or
    cos; and since they do not depend on the pixel size, a batch shares them across particles.
    """
    lib = torch if isinstance(sx, torch.Tensor) else np
    s2 = sx * sx + sy * sy
    pos = s2 > 0
    safe = lib.where(pos, s2, lib.ones_like(s2))
    cos2t = lib.where(pos, (sx * sx - sy * sy) / safe, lib.ones_like(s2))
    sin2t = lib.where(pos, 2 * sx * sy / safe, lib.zeros_like(s2))
    return s2, cos2t, sin2t


def _ctf_from_terms(s2: Array, cos2t: Array, sin2t: Array, dfu: Array, dfv: Array, ang: Array, kv: Array,
                    cs: Array, w: Array, phase: Array, b: Array) -> Array:
    """The RELION CTF from squared spatial frequency s² (Å⁻²) and the angular terms of `_angular_terms`."""
    torch_mode = isinstance(s2, torch.Tensor)
    lib = torch if torch_mode else np
    lam = electron_wavelength(kv)
    ang_rad = ang * (2 * math.pi / 180)
    mean, half = 0.5 * (dfu + dfv), 0.5 * (dfu - dfv)
    defocus = -(mean + half * (cos2t * lib.cos(ang_rad) + sin2t * lib.sin(ang_rad)))
    # γ = π λ Δ s² + (π/2) Cs λ³ s⁴ - φ - atan(w/√(1-w²)), evaluated as s²·(a·Δ + c·s²) - offset
    a = math.pi * lam
    c = 0.5 * math.pi * (cs * 1e7) * lam**3
    offset = phase * (math.pi / 180) + lib.arctan(w / lib.sqrt(1 - w**2))
    ctf = lib.sin(offset - s2 * (a * defocus + c * s2))  # = -sin γ
    if torch_mode or np.any(b != 0):
        ctf = ctf * lib.exp((-0.25 * b) * s2)
    return ctf


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

    def as_arr(x):
        if torch_mode:
            return torch.as_tensor(x, dtype=freqs.dtype, device=freqs.device)
        return np.asarray(x, dtype=np.float64)

    if not torch_mode:
        freqs = np.asarray(freqs, dtype=np.float64)
    s2, cos2t, sin2t = _angular_terms(freqs[..., 0], freqs[..., 1])
    params = [as_arr(x) for x in (defocus_u, defocus_v, defocus_angle_deg, voltage_kv, cs_mm, amp_contrast,
                                  phase_shift_deg, bfactor)]
    return _ctf_from_terms(s2, cos2t, sin2t, *params)


def ctf_from_params(freqs_cpx: Array, params: Array) -> Array:
    """CTF for a batch from the (N, 9) parameter array (`CTF_COLUMNS`) and a lattice in cycles/px.

    `freqs_cpx` (P, 2) holds (kx, ky) in cycles/pixel of the current box; each particle's pixel size
    (column 0) converts them to Å⁻¹. Returns (N, P). The angular terms are computed once for the lattice
    and s² = |k|²/apix² per particle, so a batch costs a few elementwise passes over (N, P).
    """
    if isinstance(freqs_cpx, torch.Tensor) or isinstance(params, torch.Tensor):
        ref = freqs_cpx if isinstance(freqs_cpx, torch.Tensor) else params
        k = torch.as_tensor(freqs_cpx, device=ref.device)
        p = torch.as_tensor(params, device=ref.device)
        dtype = torch.promote_types(k.dtype, p.dtype)
        k, p = k.to(dtype), p.to(dtype)
    else:
        k = np.asarray(freqs_cpx, dtype=np.float64)
        p = np.asarray(params, dtype=np.float64)
    k2, cos2t, sin2t = _angular_terms(k[:, 0], k[:, 1])
    s2 = k2[None, :] / (p[:, 0:1] * p[:, 0:1])
    cols = [p[:, i : i + 1] for i in range(1, 9)]
    return _ctf_from_terms(s2, cos2t[None, :], sin2t[None, :], *cols)
