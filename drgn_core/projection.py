"""Image formation: Fourier-slice projection, in-plane shifts, and rendering of CTF-modulated images.

The projection of a volume V at pose A is P(x, y) = Σ_z V(Aᵀ·(x, y, z)) (drgn_core.pose). By the
projection-slice theorem its centred 2D transform is the central slice of V's centred 3D transform at
Aᵀ·(kx, ky, 0), k in cycles/px. We sample that slice by trilinear interpolation of the transform of the
volume zero-padded to pad·D (default 2): padding halves the lattice spacing of the 3D transform, which is
what makes linear interpolation accurate (interpolating an unpadded transform blurs the slice and leaves
wrap-around artefacts).

Normalisation: the padded transform is an unscaled DFT, so the sampled slice is the unscaled 2D DFT of
P and `ifft2_center(slice).real` is P itself (in volume units summed along z).

Shifts follow RELION's rlnOriginX/YAngst (docs/architecture.md § Shifts): the stored origin t (px) is the
translation that re-centres the particle, applied to a transform as exp(-2πi k·t). An image whose particle
sits displaced by +d from the box centre therefore has origin t = -d, and rendering a particle at its origin t
means translating the centred projection by -t.

Every function but the slow reference `project_real` accepts numpy arrays or torch tensors (CPU or GPU)
and returns the same kind. The numpy slicer is a vectorised hand-written trilinear gather; the torch
slicer uses `grid_sample`, so the same code runs on a GPU. `render_images` is the fast path (half
spectrum, batched); `render_full` spells out the same model on full slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from drgn_core.ctf import ctf_from_params
from drgn_core.fourier import freqs_1d, ifft2_center

Array = np.ndarray | torch.Tensor

# Sample points per trilinear gather chunk (numpy path): bounds the temporary arrays to ~100 MB.
_POINTS_PER_CHUNK = 1 << 21


@dataclass
class VolumeFT:
    """The centred 3D transform of a volume zero-padded from D to P = pad·D voxels per side.

    `D` maps frequencies in cycles/px of the original box to transform voxels: frequency k lies at index
    k·P + P//2 of the z and y axes. With `half` (what `prepare_volume_ft` makes) only kx ≥ 0 is stored,
    kx at index kx·P of the last axis (P/2 + 1 entries), as an rfft stores it: the transform of a real
    volume is Hermitian, F(-q) = conj F(q), so a sample at qx < 0 is read at -q and conjugated. That
    halves the transform's memory and the cost of computing it.
    """

    data: Array  # (P, P, P) or, with half, (P, P, P/2 + 1) complex; [z, y, x]
    D: int
    half: bool = False
    _grid_input: torch.Tensor | None = field(default=None, repr=False)

    @property
    def P(self) -> int:
        return int(self.data.shape[-2])

    @property
    def is_torch(self) -> bool:
        return isinstance(self.data, torch.Tensor)

    def grid_input(self) -> torch.Tensor:
        """(1, 2, P, P, X) real/imaginary channels for `grid_sample`, built once and cached."""
        if self._grid_input is None:
            self._grid_input = torch.view_as_real(self.data).permute(3, 0, 1, 2).unsqueeze(0).contiguous()
        return self._grid_input

    def full(self) -> Array:
        """The full (P, P, P) centred transform (the half layout completed by Hermitian symmetry)."""
        if not self.half:
            return self.data
        P, F = self.P, self.data
        neg = (P - np.arange(P)) % P  # index of -k for a centred axis of even length
        lower = np.arange(P // 2)  # x indices of kx < 0, read from -kx = P/2 - i ≥ 0 (half index)
        if isinstance(F, torch.Tensor):
            negt = torch.as_tensor(neg, device=F.device)
            mirrored = F[negt][:, negt][:, :, torch.as_tensor(P // 2 - lower, device=F.device)].conj()
            return torch.cat([mirrored, F[:, :, : P // 2]], dim=-1)
        mirrored = np.conj(F[neg][:, neg][:, :, P // 2 - lower])
        return np.concatenate([mirrored, F[:, :, : P // 2]], axis=-1)


def _checkerboard(n: int, start: int, lib, dtype, device=None) -> Array:
    """(-1)^(start + i) for i < n, as a 1D array of `lib`."""
    signs = 1.0 - 2.0 * ((np.arange(n) + start) % 2)
    if lib is torch:
        return torch.as_tensor(signs, dtype=dtype, device=device)
    return signs.astype(dtype)


def prepare_volume_ft(vol: Array, pad: int = 2) -> VolumeFT:
    """Zero-pad a real (D, D, D) volume to pad·D (centre kept at the centre voxel) and transform it.

    Returns the kx ≥ 0 half (`VolumeFT.half`) of `fft3_center` of the padded volume, computed without the
    full-size rolls of fftshift/ifftshift (they cost more than the FFT). For a centred axis of even length
    P, the transform at index k is (-1)^(P/2) (-1)^k · FFT((-1)^x v)[k]; along x, the rfft at kx = j ≥ 0
    is (-1)^j · rfft(v)[j]. The input modulation touches only the D³ voxels, and the transform runs as
    one real-to-complex FFT. `VolumeFT.full()` gives the full transform when one is needed.

    Float32 input gives a complex64 transform, float64 a complex128 one; torch input stays on its device.
    """
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"expected a cubic (D, D, D) volume, got shape {tuple(vol.shape)}")
    D = int(vol.shape[-1])
    if D % 2:
        raise ValueError(f"volume box must be even, got D={D}")
    if pad < 1:
        raise ValueError(f"pad must be >= 1, got {pad}")
    P = int(pad) * D
    o = P // 2 - D // 2
    # (-1)^(P/2) from each of the z and y axes: their product is +1 for any even P.
    if isinstance(vol, torch.Tensor):
        if not vol.is_floating_point():
            vol = vol.float()
        dt, dev = vol.dtype, vol.device
        cin = _checkerboard(D, o, torch, dt, dev)
        padded = vol.new_zeros((P, P, P))
        padded[o : o + D, o : o + D, o : o + D] = vol * (cin[:, None, None] * cin[None, :, None])
        F = torch.fft.rfftn(padded)
        cout = _checkerboard(P, 0, torch, dt, dev)
        F *= cout[:, None, None] * cout[None, :, None] * cout[: P // 2 + 1]
        return VolumeFT(F, D, half=True)
    v = np.asarray(vol)
    real_dtype = np.float64 if v.dtype == np.float64 else np.float32
    cin = _checkerboard(D, o, np, real_dtype)
    padded = np.zeros((P, P, P), dtype=real_dtype)
    padded[o : o + D, o : o + D, o : o + D] = v * (cin[:, None, None] * cin[None, :, None])
    cdtype = np.complex128 if real_dtype == np.float64 else np.complex64
    F = np.fft.rfftn(padded).astype(cdtype, copy=False)
    cout = _checkerboard(P, 0, np, real_dtype)
    F *= cout[:, None, None] * cout[None, :, None] * cout[: P // 2 + 1]
    return VolumeFT(F, D, half=True)


def _as_volume_ft(vol_ft: VolumeFT | Array) -> VolumeFT:
    """A raw centred transform is taken as unpadded (P = D)."""
    if isinstance(vol_ft, VolumeFT):
        return vol_ft
    return VolumeFT(vol_ft, int(vol_ft.shape[-1]))


def slice_lattice(D: int, D_out: int | None = None, half: bool = False) -> np.ndarray:
    """(M, 3) frequencies (kx, ky, 0) in cycles/px of a D box at which an image's slice is sampled.

    half=False: the centred D_out×D_out lattice in [y, x] order, M = D_out². half=True: the rfft layout
    used by `render_images` — ky in FFT order (D_out rows) and kx = 0, 1, …, D_out/2 - 1 cycles/D followed
    by the Nyquist column sampled at kx = -1/2 (as the centred lattice does), M = D_out·(D_out/2 + 1).
    """
    D_out = D if D_out is None else D_out
    j = np.arange(D_out) - D_out // 2
    if half:
        ky = np.fft.ifftshift(j) / D
        kx = np.concatenate([np.arange(D_out // 2), [-D_out // 2]]) / D
    else:
        ky = kx = j / D
    KY, KX = np.meshgrid(ky, kx, indexing="ij")
    return np.stack([KX.ravel(), KY.ravel(), np.zeros(KX.size)], axis=-1)


def _check_poses(A: Array) -> tuple[Array, bool]:
    single = A.ndim == 2
    if single:
        A = A[None]
    if A.ndim != 3 or tuple(A.shape[-2:]) != (3, 3):
        raise ValueError(f"poses must have shape (n, 3, 3) or (3, 3), got {tuple(A.shape)}")
    return A, single


def _voxel_coords(vft: VolumeFT, q: Array) -> tuple[Array, Array | None]:
    """Transform-voxel coordinates (x, y, z) of frequencies q (..., 3) and, for a half transform, the
    sign (+1, or -1 where q was mirrored to -q and the sample must be conjugated)."""
    P = vft.P
    if not vft.half:
        return q * P + P // 2, None
    lib = torch if isinstance(q, torch.Tensor) else np
    sign = lib.where(q[..., 0:1] < 0, -1.0, 1.0)
    if lib is torch:
        sign = sign.to(q.dtype)
    qm = q * sign
    idx = qm * P
    idx[..., 1:] += P // 2
    return idx, sign[..., 0]


def _sample_numpy(vft: VolumeFT, A: np.ndarray, lattice: np.ndarray) -> np.ndarray:
    """Trilinear samples (n, M) of the transform at Aₙᵀ·k for each lattice row k; zero outside the grid."""
    F = np.asarray(vft.data)
    Z, Y, X = F.shape
    flat = F.reshape(-1)
    real_dtype = np.float64 if F.dtype == np.complex128 else np.float32
    n, M = A.shape[0], lattice.shape[0]
    out = np.empty((n, M), dtype=F.dtype)
    per = max(1, _POINTS_PER_CHUNK // M)
    for a in range(0, n, per):
        q = np.einsum("mc,ncd->nmd", lattice, A[a : a + per]).reshape(-1, 3)  # rows (Aᵀk)ᵀ = kᵀA
        idx, sign = _voxel_coords(vft, q)
        i0 = np.floor(idx).astype(np.int64)
        f = (idx - i0).astype(real_dtype)
        acc = np.zeros(len(idx), dtype=F.dtype)
        for dz in (0, 1):
            iz = i0[:, 2] + dz
            wz = f[:, 2] if dz else 1 - f[:, 2]
            for dy in (0, 1):
                iy = i0[:, 1] + dy
                wzy = wz * (f[:, 1] if dy else 1 - f[:, 1])
                for dx in (0, 1):
                    ix = i0[:, 0] + dx
                    w = wzy * (f[:, 0] if dx else 1 - f[:, 0])
                    inside = (ix >= 0) & (ix < X) & (iy >= 0) & (iy < Y) & (iz >= 0) & (iz < Z)
                    lin = np.where(inside, (iz * Y + iy) * X + ix, 0)
                    acc += np.where(inside, w, 0) * flat[lin]
        if sign is not None:
            acc = np.where(sign < 0, np.conj(acc), acc)
        out[a : a + per] = acc.reshape(-1, M)
    return out


def _sample_torch(vft: VolumeFT, A: torch.Tensor, lattice: np.ndarray) -> torch.Tensor:
    """As `_sample_numpy`, with `grid_sample` (trilinear, zeros outside) so it runs on any device."""
    F = vft.data
    real_dtype = torch.float64 if F.dtype == torch.complex128 else torch.float32
    lat = torch.as_tensor(lattice[:, :2], dtype=real_dtype, device=F.device)  # kz = 0 on every slice
    A = A.to(dtype=real_dtype, device=F.device)
    q = torch.matmul(lat, A[:, :2, :])  # (n, M, 3), rows (Aᵀk)ᵀ = kᵀA
    idx, sign = _voxel_coords(vft, q)
    # grid_sample (align_corners=True) maps -1 → voxel 0 and +1 → the last voxel; coordinates (x, y, z).
    sizes = torch.tensor([F.shape[2], F.shape[1], F.shape[0]], dtype=real_dtype, device=F.device)
    grid = idx * (2.0 / (sizes - 1)) - 1.0
    n, M = q.shape[0], q.shape[1]
    vals = torch.nn.functional.grid_sample(vft.grid_input(), grid.reshape(1, 1, n, M, 3), mode="bilinear",
                                           padding_mode="zeros", align_corners=True)
    vals = vals.reshape(2, n, M)
    imag = vals[1] if sign is None else vals[1] * sign
    return torch.complex(vals[0], imag)


def sample_slices(vol_ft: VolumeFT, A: torch.Tensor, coords2d: torch.Tensor) -> torch.Tensor:
    """Samples (n, M) complex of a torch `prepare_volume_ft` transform at Aₙᵀ·(kx, ky, 0) for each row of
    `coords2d` (M, 2) in cycles/px of the volume's box: central slices on any 2D point set (e.g. the
    low-frequency half lattice a pose search scores), trilinear, zero outside the grid."""
    lattice = np.zeros((coords2d.shape[0], 3))
    lattice[:, :2] = coords2d.detach().cpu().numpy()
    return _sample_torch(vol_ft, A, lattice)


def project_volume_ft(vol_ft: VolumeFT | Array, A: Array, D_out: int | None = None) -> Array:
    """Central slices (n, D_out, D_out) complex: the centred 2D transforms of the projections at poses A.

    `vol_ft` is a `prepare_volume_ft` result (or a raw centred transform, taken as unpadded). D_out < D
    returns the central D_out×D_out block of each slice (the transform of the projection Fourier-cropped
    to D_out px, whose pixel size is apix·D/D_out). A single (3, 3) pose gives a (D_out, D_out) slice.
    """
    vft = _as_volume_ft(vol_ft)
    D_out = vft.D if D_out is None else int(D_out)
    if D_out > vft.D or D_out % 2:
        raise ValueError(f"D_out must be even and <= D={vft.D}, got {D_out}")
    A, single = _check_poses(A)
    lattice = slice_lattice(vft.D, D_out)
    if vft.is_torch:
        out = _sample_torch(vft, torch.as_tensor(A), lattice)
    else:
        out = _sample_numpy(vft, np.asarray(A, dtype=np.float64), lattice)
    out = out.reshape(-1, D_out, D_out)
    return out[0] if single else out


def shift_phase(D: int, shift_px: Array, half: bool = False, dtype=None) -> Array:
    """exp(-2πi k·t) on the centred D×D lattice for shifts t (n, 2) = (x, y) px → (n, D, D) complex.

    half=True gives it on `slice_lattice(D, half=True)`'s rfft layout, (n, D, D/2 + 1). Built as an outer
    product of per-axis factors (computed in double precision, then cast to `dtype`, default complex128),
    so it costs O(D) transcendentals per image, not O(D²).
    """
    if half:
        kx = np.concatenate([np.arange(D // 2), [-D // 2]]) / D
        ky = np.fft.ifftshift(np.arange(D) - D // 2) / D
    else:
        kx = ky = freqs_1d(D)
    if isinstance(shift_px, torch.Tensor):
        t = shift_px.to(torch.float64)
        kxt = torch.as_tensor(kx, dtype=torch.float64, device=t.device)
        kyt = torch.as_tensor(ky, dtype=torch.float64, device=t.device)
        cdt = torch.complex128 if dtype is None else dtype
        px = torch.exp(-2j * torch.pi * t[:, 0:1] * kxt[None, :]).to(cdt)
        py = torch.exp(-2j * torch.pi * t[:, 1:2] * kyt[None, :]).to(cdt)
        return py[:, :, None] * px[:, None, :]
    t = np.asarray(shift_px, dtype=np.float64)
    cdt = np.complex128 if dtype is None else dtype
    px = np.exp(-2j * np.pi * t[:, 0:1] * kx[None, :]).astype(cdt, copy=False)
    py = np.exp(-2j * np.pi * t[:, 1:2] * ky[None, :]).astype(cdt, copy=False)
    return py[:, :, None] * px[:, None, :]


def apply_shift_ft(F: Array, shift_px: Array) -> Array:
    """Multiply centred transforms F (n, D, D) (or (D, D)) by exp(-2πi k·t), t = shift_px (n, 2) px.

    This translates each image by +t. With t the stored RELION origin it re-centres a particle; to
    render a particle whose stored origin is t, pass -t.
    """
    single = F.ndim == 2
    Fb = F[None] if single else F
    t = shift_px.reshape(-1, 2)
    if isinstance(Fb, torch.Tensor):
        out = Fb * shift_phase(int(Fb.shape[-1]), t, dtype=Fb.dtype if Fb.is_complex() else torch.complex64)
    else:
        out = Fb * shift_phase(int(Fb.shape[-1]), t, dtype=np.result_type(Fb.dtype, np.complex64))
    return out[0] if single else out


def project_real(vol: np.ndarray, A: np.ndarray, order: int = 3) -> np.ndarray:
    """Slow real-space reference projection P(x, y) = Σ_z V(Aᵀ·(x, y, z)), (n, D, D) or (D, D).

    Coordinates are relative to the centre voxel D//2; V is interpolated with splines of `order` and
    taken as zero outside the box. Used to check the Fourier slicer, not in production paths.
    """
    from scipy import ndimage

    vol = np.asarray(vol, dtype=np.float64)
    D = vol.shape[-1]
    A, single = _check_poses(np.asarray(A, dtype=np.float64))
    g = np.arange(D) - D // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    r = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    coeffs = ndimage.spline_filter(vol, order=order) if order > 1 else vol
    out = np.empty((len(A), D, D))
    for i, a in enumerate(A):
        q = r @ a + D // 2  # rows (Aᵀr)ᵀ, in voxel units
        vals = ndimage.map_coordinates(coeffs, [q[:, 2], q[:, 1], q[:, 0]], order=order, mode="constant",
                                       prefilter=False)
        out[i] = vals.reshape(D, D, D).sum(axis=0)
    return out[0] if single else out


def render_images(vol: VolumeFT | Array, A: Array, shifts_px: Array, ctf_params: Array | None = None,
                  apix: float | None = None, D_out: int | None = None, chunk: int = 256) -> Array:
    """Noise-free particle images ifft(CTF · shift(slice)).real, (n, D_out, D_out) float.

    - `vol`: a real (D, D, D) volume or a `prepare_volume_ft` result (pass the latter when rendering many
      batches of one volume, so the padded transform is computed once);
    - `A`: (n, 3, 3) poses; `shifts_px`: (n, 2) stored RELION origins in px of the rendered image — the
      particle is drawn displaced by -origin, so `ParticleTable.shifts_px()` reproduces a dataset;
    - `ctf_params`: (n, 9) in `drgn_core.ctf.CTF_COLUMNS` order, or None for plain shifted projections;
      column 0 (pixel size of the rendered images) is replaced by `apix` when given.

    Works on the rfft half of each slice (the slice of a real volume is Hermitian and the CTF is even), so
    each image costs half the interpolation and CTF work of a full slice. The result equals
    `render_full` = ifft2_center(ctf · apply_shift_ft(project_volume_ft(...), -t)).real but for how the
    unpaired Nyquist row and column (k = -1/2) are symmetrised, a difference of the size of the signal at
    Nyquist (~1e-5 of the image for a smooth object).
    """
    is_torch = isinstance(vol.data if isinstance(vol, VolumeFT) else vol, torch.Tensor)
    vft = vol if isinstance(vol, VolumeFT) else prepare_volume_ft(vol)
    D_out = vft.D if D_out is None else int(D_out)
    if D_out > vft.D or D_out % 2:
        raise ValueError(f"D_out must be even and <= D={vft.D}, got {D_out}")
    A, _ = _check_poses(A)
    n = A.shape[0]
    lattice = slice_lattice(vft.D, D_out, half=True)
    lattice_cpx = slice_lattice(D_out, D_out, half=True)[:, :2]  # cycles per px of the rendered image
    H = D_out // 2 + 1
    outs = []
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        if is_torch:
            dev = vft.data.device
            real_dtype = torch.float64 if vft.data.dtype == torch.complex128 else torch.float32
            S = _sample_torch(vft, torch.as_tensor(A[a:b]), lattice).reshape(b - a, D_out, H)
            t = torch.as_tensor(shifts_px[a:b], dtype=torch.float64, device=dev)
            S = S * shift_phase(D_out, -t, half=True, dtype=S.dtype)
            if ctf_params is not None:
                p = torch.as_tensor(ctf_params[a:b], dtype=real_dtype, device=dev).clone()
                if apix is not None:
                    p[:, 0] = apix
                S = S * ctf_from_params(torch.as_tensor(lattice_cpx, dtype=real_dtype, device=dev),
                                        p).reshape(b - a, D_out, H)
            img = torch.fft.fftshift(torch.fft.irfft2(S, s=(D_out, D_out)), dim=(-2, -1))
        else:
            S = _sample_numpy(vft, np.asarray(A[a:b], dtype=np.float64), lattice).reshape(b - a, D_out, H)
            t = np.asarray(shifts_px[a:b], dtype=np.float64)
            S = S * shift_phase(D_out, -t, half=True, dtype=S.dtype)
            if ctf_params is not None:
                p = np.array(ctf_params[a:b], dtype=np.float64)
                if apix is not None:
                    p[:, 0] = apix
                S = S * ctf_from_params(lattice_cpx, p).reshape(b - a, D_out, H)
            img = np.fft.fftshift(np.fft.irfft2(S, s=(D_out, D_out)), axes=(-2, -1))
        outs.append(img)
    if is_torch:
        return torch.cat(outs) if outs else torch.empty((0, D_out, D_out))
    return np.concatenate(outs) if outs else np.empty((0, D_out, D_out))


def render_full(vol_ft: VolumeFT | Array, A: Array, shifts_px: Array, ctf: Array | None = None) -> Array:
    """Reference form of `render_images`: ifft2_center(ctf · apply_shift_ft(slice, -t)).real on full slices.

    `ctf` is (n, D, D) on the centred lattice or None. Kept for tests and for readers who want the
    textbook expression; `render_images` is the fast path.
    """
    F = project_volume_ft(vol_ft, A)
    F = apply_shift_ft(F, -shifts_px)
    if ctf is not None:
        F = F * ctf
    return ifft2_center(F).real
