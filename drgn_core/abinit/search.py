"""Pose search from scratch: rotations on a hierarchical SO(3) grid and in-plane shifts, at a growing
Fourier radius, alternated with reconstruction (stochastic hard-assignment expectation-maximisation).

One iteration, at Fourier radius L (px of the stack's box):

1. Reference. The volume's transform comes from a Wiener-filtered back-projection of every image at the
   poses drawn in the previous iteration (`drgn_core.backproject.reconstruct`: two half maps, the
   full map filtered by their FSC). The first reference uses random poses (a seeded draw): a near
   spherical blob from which the asymmetry emerges over the iterations. A back-projection is the exact
   least-squares volume for given poses, so one pass over the data moves the reference as far as many
   epochs of gradient steps on a network would; that is what makes the search affordable on a CPU.
2. Global search. All base-grid rotations' central slices are taken ONCE per iteration from the
   reference's padded transform (`projection.sample_slices`, trilinear), on the half lattice inside
   radius L — they are shared by every image. For a batch of images the squared error of every
   (image, shift, rotation) is
       E = Σ w·c²·|S|²  -  2·Re Σ w·c·conj(Y)·e^{2πi k·t}·S  +  Σ w·|Y|²
   (Y image transform, c CTF, S slice, t shift, w the half lattice's weights): one real matrix product
   (images × shifts, 2P) @ (2P, rotations) for the cross term and one for the norms. Shifts are phase
   factors shared by all rotations. The `keep` best rotations per image (each with its best shift) go on.
3. Local refinement. Each kept pose is refined `local_levels` times over its 27 rotation neighbours
   (`grid.local_offsets`, step halved per level) × 9 shift neighbours (step halved per level), keeping
   the best neighbour per candidate so the candidates stay in separate basins. After each level the
   better half of the candidates goes on (K = 8 → 4 → 2 over 3 levels): the local slices are most of a
   hard round's cost, and this cuts them from 24 to 14 candidate-levels per image.
4. Assignment. The final pose of an image is its best candidate; the pose used for the next reference is
   drawn from the candidates' posterior p_k ∝ exp(-(E_k - E_min)·n/(2·E_min)) (Gaussian noise whose
   per-pixel variance E_min/n is estimated from the best residual): a stochastic hard EM that, unlike a
   plain argmin, does not freeze an early wrong consensus.

Confidence. For each image, the gap between the best rotation's error and the best error among base-grid
rotations more than `confidence_angle` degrees away from it, in units of the per-pixel noise variance
(Δχ²). Near 0: a second, distinct orientation explains the image as well (a noisy or junk particle).

The radius L grows linearly from `L_min` to `L_max` over the iterations (coarse features first: they
have the signal at SNR 0.1, and a small L makes the slices and products cheap).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from drgn_core.abinit.grid import base_grid, grid_spacing, local_offsets, local_shifts, shift_grid
from drgn_core.ctf import ctf_from_params
from drgn_core.fourier import fft2_center
from drgn_core.models import HalfLattice
from drgn_core.projection import VolumeFT, prepare_volume_ft, sample_slices


@dataclass
class SearchConfig:
    """Settings of the pose search (recorded in config.yaml under abinit.search)."""

    iterations: int = 18         # search + reconstruction rounds
    soft_iterations: int = 15    # of which the first ones are soft (posterior over the whole grid)
    minibatch: int = 200         # soft rounds use this many random images (0: all), cryoSPARC-like SGD
    decay: float = 0.5           # soft rounds: weight of the previous rounds' sums in the next reference
    L_min: int = 10              # Fourier radius (px of the stack's box) of the first round ...
    L_max: int = 0               # ... and of the last; 0 → min(24, D/2 - 1)
    base_rotations: int = 2048   # base SO(3) grid, ~12° (cryoDRGN: 4608); hard rounds refine locally
    keep: int = 8                # candidate poses kept per image after the global search (cryoDRGN: 8)
    local_levels: int = 3        # local refinement levels (rotation and shift steps halved at each)
    shift_extent: float = 0.0    # shift grid spans ±this many px; 0 → 0.1·D
    shift_points: int = 7        # shift grid points per axis (cryoDRGN: 7 × 7)
    batch: int = 64              # images scored together
    confidence_angle: float = 20.0  # the second-best pose is the best one at least this far (degrees)
    scale: bool = True           # fit an amplitude per image and pose (scores are then correlations)
    classes: int = 0             # zdim > 0: classes of the multi-class rounds (abinit.classes); 0: off
    class_rounds: int = 6        # rounds of multi-class search and reconstruction
    starts: int = 4              # soft rounds from this many random starts; the most confident continues
    probe: int = 500             # images every start's map is scored on (rounds.choose_start)

    @classmethod
    def from_dict(cls, d: dict) -> SearchConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self, D: int) -> SearchConfig:
        """A copy with the box-dependent defaults filled in."""
        c = SearchConfig(**asdict(self))
        if c.L_max <= 0:
            c.L_max = min(24, D // 2 - 1)
        c.L_max = min(c.L_max, D // 2 - 1)
        c.L_min = min(c.L_min, c.L_max)
        if c.shift_extent <= 0:
            c.shift_extent = 0.1 * D
        return c

    def radius(self, iteration: int) -> int:
        """Fourier radius L of round `iteration` (0-based): linear from L_min to L_max."""
        if self.iterations <= 1:
            return self.L_max
        f = iteration / (self.iterations - 1)
        return round(self.L_min + f * (self.L_max - self.L_min))


@dataclass
class SearchResult:
    """Per-image outcome of one search round (rows = the run's particles, in order)."""

    poses: np.ndarray        # (N, 3, 3) best pose
    shifts: np.ndarray       # (N, 2) best shift, px of the stack (RELION origin sign)
    error: np.ndarray        # (N,) squared error of the best pose, inside radius L
    confidence: np.ndarray   # (N,) Δχ² to the best distinct (> confidence_angle) rotation
    drawn_poses: np.ndarray  # (N, 3, 3) the pose drawn from the posterior, for the next reference
    drawn_shifts: np.ndarray  # (N, 2)


class LowResLattice:
    """The half-lattice pixels of a D box inside radius L: where images and slices are compared."""

    def __init__(self, D: int, L: int, device: torch.device):
        lat = HalfLattice(D)
        r = np.linalg.norm(lat.coords, axis=1) * D
        sel = r < L
        self.flat = torch.from_numpy(lat.flat[sel]).to(device)                              # into D×D
        self.coords = torch.from_numpy(lat.coords[sel]).to(device, torch.float64)           # (P, 2)
        self.w = torch.from_numpy(lat.weights[sel]).to(device, torch.float32)               # (P,)
        self.n_pix = float(lat.weights[sel].sum())
        self.P = int(sel.sum())


def _phases(coords: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """e^{+2πi k·t} for shifts t (…, 2) px → (…, P) complex64: what a particle at origin t multiplies
    the centred transform by (docs/architecture.md § Shifts)."""
    ph = 2.0 * math.pi * (t.to(torch.float64) @ coords.T)
    return torch.polar(torch.ones_like(ph), ph).to(torch.complex64)


def _cross(G: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Re(G · Sᵀ) as one real product: G (..., m, P), S (..., r, P) complex → (..., m, r) float32."""
    Gr = torch.cat([G.real, -G.imag], dim=-1)
    Sr = torch.cat([S.real, S.imag], dim=-1)
    return Gr @ Sr.transpose(-1, -2)


class PoseSearch:
    """One round of the search against one reference volume at radius L (see the module docstring)."""

    def __init__(self, vol: np.ndarray, cfg: SearchConfig, L: int, apix: float, device: torch.device):
        self.cfg, self.L, self.apix, self.device = cfg, L, apix, device
        D = vol.shape[-1]
        self.D = D
        self.lat = LowResLattice(D, L, device)
        self.vft: VolumeFT = prepare_volume_ft(torch.as_tensor(vol, dtype=torch.float32, device=device))
        self.grid = torch.as_tensor(base_grid(cfg.base_rotations), dtype=torch.float32, device=device)
        self.grid_quat = torch.as_tensor(_quats(base_grid(cfg.base_rotations)), dtype=torch.float32,
                                         device=device)
        coords = self.lat.coords.float()
        self.S = torch.cat([sample_slices(self.vft, self.grid[a:a + 1024], coords)
                            for a in range(0, len(self.grid), 1024)])                        # (R, P)
        self.S_norm = (self.S.real ** 2 + self.S.imag ** 2).T.contiguous()                  # (P, R)
        self.t_grid = torch.as_tensor(shift_grid(cfg.shift_extent, cfg.shift_points), device=device)
        self.t_step = 2 * cfg.shift_extent / max(cfg.shift_points - 1, 1)
        self.r_step = grid_spacing(cfg.base_rotations) / 2

    def prepare(self, images: np.ndarray, ctf_params: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, D, D) → (Y (B, P) complex64 transforms inside L, c (B, P) CTF)."""
        x = torch.as_tensor(np.ascontiguousarray(images, dtype=np.float32), device=self.device)
        Y = fft2_center(x).reshape(len(x), -1)[:, self.lat.flat].to(torch.complex64)
        p = torch.as_tensor(np.asarray(ctf_params, dtype=np.float64), device=self.device)
        c = ctf_from_params(self.lat.coords, p).float()
        return Y, c

    def _energies(self, Y: torch.Tensor, c: torch.Tensor, S: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Errors minus Σw|Y|² for every (image, shift, slice): Y, c (B, P); S (B, r, P) or (r, P);
        t (B, s, 2) or (s, 2) → (B, s, r)."""
        w = self.lat.w
        ph = _phases(self.lat.coords, t)                                    # (…, s, P)
        G = (w * c)[:, None, :] * Y.conj()[:, None, :] * ph                  # (B, s, P)
        cross = _cross(G, S)                                                 # (B, s, r)
        S2 = (S.real ** 2 + S.imag ** 2)
        if S.ndim == 2:
            norm = (w * c * c) @ S2.T                                        # (B, r)
        else:
            norm = torch.einsum("bp,brp->br", w * c * c, S2)
        if self.cfg.scale:
            # the best per-image amplitude a = cross/norm (≥ 0): E = Σw|Y|² - cross²/norm, a normalised
            # correlation that an early reference of the wrong amplitude cannot bias towards weak slices
            return -(cross.clamp_min(0) ** 2) / norm.clamp_min(1e-30)[:, None, :]
        return norm[:, None, :] - 2.0 * cross

    def global_search(self, Y: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                         torch.Tensor, torch.Tensor]:
        """Best `keep` (rotation index, shift) per image over the base grid × shift grid, plus the
        confidence gap. Returns (rot_idx (B, K), shifts (B, K, 2), E (B, K), gap (B,))."""
        B, R = Y.shape[0], self.S.shape[0]
        best = torch.full((B, R), float("inf"), device=self.device)
        best_t = torch.zeros((B, R), dtype=torch.long, device=self.device)
        for a in range(0, R, 2048):
            E = self._energies(Y, c, self.S[a:a + 2048], self.t_grid)       # (B, T, r)
            e, ti = E.min(dim=1)
            best[:, a:a + 2048], best_t[:, a:a + 2048] = e, ti
        K = min(self.cfg.keep, R)
        E_k, r_k = torch.topk(best, K, dim=1, largest=False)
        t_k = self.t_grid[best_t.gather(1, r_k)]                           # (B, K, 2)
        # confidence: best error among rotations far from the best one
        q_best = self.grid_quat[r_k[:, 0]]                                 # (B, 4)
        near = (q_best @ self.grid_quat.T).abs() > math.cos(math.radians(self.cfg.confidence_angle) / 2)
        second = torch.where(near, torch.full_like(best, float("inf")), best).min(dim=1).values
        return r_k, t_k, E_k, second - E_k[:, 0]

    def local_refine(self, Y: torch.Tensor, c: torch.Tensor, A: torch.Tensor, t: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Refine candidates A (B, K, 3, 3), t (B, K, 2) → (A, t, E (B, K')) after `local_levels` levels;
        K' = K halved (rounded up) at each level after the first."""
        B = A.shape[0]
        coords = self.lat.coords.float()
        E = None
        for level in range(self.cfg.local_levels):
            if E is not None and A.shape[1] > 1:
                # prune: after each level only the better half of the candidates goes on (8 → 4 → 2 at
                # the defaults): the finer levels then cost 14 candidate-levels instead of 24 (the D 64
                # search's accuracy was unchanged by it: bench/README.md, *Ab initio*)
                keep = (A.shape[1] + 1) // 2
                order = torch.argsort(E, dim=1)[:, :keep]
                bi = torch.arange(B)[:, None]
                A, t = A[bi, order], t[bi, order]
            K = A.shape[1]
            rs, ts = self.r_step / 2 ** level, self.t_step / 2 ** (level + 1)
            O = torch.as_tensor(local_offsets(rs), dtype=A.dtype, device=self.device)      # (27, 3, 3)
            An = (O[None, None] @ A[:, :, None]).reshape(B * K * 27, 3, 3)                 # O·A
            S = sample_slices(self.vft, An, coords).reshape(B * K, 27, -1)                 # (BK, 27, P)
            tn = t[:, :, None, :] + torch.as_tensor(local_shifts(ts), device=self.device)  # (B, K, 9, 2)
            Yk = Y[:, None].expand(B, K, -1).reshape(B * K, -1)
            ck = c[:, None].expand(B, K, -1).reshape(B * K, -1)
            En = self._energies(Yk, ck, S, tn.reshape(B * K, 9, 2)).reshape(B, K, 9 * 27)  # (B, K, 9·27)
            E, j = En.min(dim=-1)
            si, oi = j // 27, j % 27
            A = An.reshape(B, K, 27, 3, 3)[torch.arange(B)[:, None], torch.arange(K)[None], oi]
            t = tn[torch.arange(B)[:, None], torch.arange(K)[None], si]
        return A, t, E

    def run_batch(self, images: np.ndarray, ctf_params: np.ndarray, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
        """Search one batch; returns best and drawn poses/shifts, best error and confidence (numpy)."""
        Y, c = self.prepare(images, ctf_params)
        r_k, t_k, E, gap = self.global_search(Y, c)
        A = self.grid[r_k]                                                  # (B, K, 3, 3)
        if self.cfg.local_levels > 0:
            A, t_k, E = self.local_refine(Y, c, A, t_k)
        Y2 = (self.lat.w * (Y.real ** 2 + Y.imag ** 2)).sum(-1)             # (B,)
        E_full = (E + Y2[:, None]).double().cpu().numpy()                   # (B, K) ≥ 0
        best = E_full.argmin(axis=1)
        e_min = E_full[np.arange(len(best)), best]
        sigma2 = np.maximum(e_min / self.lat.n_pix, 1e-30)                  # per-pixel noise variance
        logp = -(E_full - e_min[:, None]) / (2 * sigma2[:, None])
        p = np.exp(logp)
        p /= p.sum(axis=1, keepdims=True)
        u = rng.random(len(p))
        drawn = np.minimum((np.cumsum(p, axis=1) < u[:, None]).sum(axis=1), p.shape[1] - 1)
        A_np, t_np = A.double().cpu().numpy(), t_k.double().cpu().numpy()
        i = np.arange(len(best))
        return {"poses": A_np[i, best], "shifts": t_np[i, best], "error": e_min,
                "confidence": gap.double().cpu().numpy() / sigma2,
                "drawn_poses": A_np[i, drawn], "drawn_shifts": t_np[i, drawn]}


def _quats(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(R).as_quat()


# ---- soft rounds: expectation over the whole grid ---------------------------------------------------
class SoftAccumulator:
    """Σ_b p·c·Ỹ and Σ_b p·c² per base-grid rotation and half set: a "class average" slice per rotation.

    The expected back-projection of soft EM inserts every image at every rotation and shift with its
    posterior weight p. Summing over images first, per rotation, turns that into matrix products
    (rotations × images) @ (images × pixels), one per shift, and leaves only R slices to insert at the end
    of the round — the data enter once per round, and the cost is that of the scoring.
    """

    def __init__(self, R: int, P: int, device: torch.device):
        self.M = torch.zeros((2, R, P), dtype=torch.complex64, device=device)
        self.W = torch.zeros((2, R, P), dtype=torch.float32, device=device)


def soft_batch(search: PoseSearch, acc: SoftAccumulator, images: np.ndarray, ctf_params: np.ndarray,
               halves: np.ndarray) -> dict[str, np.ndarray]:
    """Posterior over (shift, rotation) of each image of a batch, accumulated into `acc`; returns the
    most probable pose and shift per image and its confidence (as `PoseSearch.run_batch`)."""
    Y, c = search.prepare(images, ctf_params)
    R = search.S.shape[0]
    E = torch.cat([search._energies(Y, c, search.S[a:a + 2048], search.t_grid) for a in range(0, R, 2048)],
                  dim=2)                                                  # (B, T, R)
    B, T = E.shape[:2]
    Y2 = (search.lat.w * (Y.real ** 2 + Y.imag ** 2)).sum(-1)
    flat = E.reshape(B, -1)
    e_min, j = flat.min(dim=1)
    sigma2 = ((e_min + Y2) / search.lat.n_pix).clamp_min(1e-30)
    p = torch.softmax(-(flat - e_min[:, None]) / (2 * sigma2[:, None]), dim=1).reshape(B, T, R)
    ph = _phases(search.lat.coords, search.t_grid)                       # (T, P)
    H = (c * Y)[:, None, :] * ph.conj()[None]                            # (B, T, P) c·Y·e^{-2πik·t}
    h = torch.as_tensor(halves, device=search.device)
    for half in (0, 1):
        m = h == half
        if not bool(m.any()):
            continue
        # Σ_{b,t} p[b,t,r]·H[b,t,p] as ONE real product (R, b·T) @ (b·T, 2P): a long inner dimension keeps
        # the matrix unit busy, where T small products of inner size b (and a (T, R, P) sum) did not
        pm = p[m]                                                         # (b, T, R)
        Hm = H[m].reshape(-1, H.shape[-1])                                # (b·T, P)
        MH = pm.reshape(-1, R).T @ torch.cat([Hm.real, Hm.imag], dim=-1)  # (R, 2P)
        P = Hm.shape[-1]
        acc.M[half] += torch.complex(MH[:, :P], MH[:, P:])
        acc.W[half] += pm.sum(1).T @ (c[m] * c[m])
    ti, ri = j // R, j % R
    best = E.reshape(B, -1).gather(1, j[:, None])[:, 0]
    q_best = search.grid_quat[ri]
    near = (q_best @ search.grid_quat.T).abs() > math.cos(math.radians(search.cfg.confidence_angle) / 2)
    per_rot = E.min(dim=1).values
    second = torch.where(near, torch.full_like(per_rot, float("inf")), per_rot).min(dim=1).values
    return {"poses": search.grid[ri].double().cpu().numpy(),
            "shifts": search.t_grid[ti].double().cpu().numpy(),
            "error": (best + Y2).double().cpu().numpy(),
            "confidence": ((second - best) / sigma2).double().cpu().numpy()}


def insert_slices(acc: SoftAccumulator, grid: torch.Tensor, lat: LowResLattice, D: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Insert the per-rotation sums into D³ Fourier grids (trilinear; each half-lattice point and its
    Hermitian mirror) → (num_1, den_1, num_2, den_2) complex128 / float64 (D, D, D), [z, y, x].

    Both half sets' numerators and weights share the positions, so they travel as six real channels
    through one `index_add_` per corner and mirror (16 in all, not 64 over separate grids)."""
    k = lat.coords.to(grid.device)                                         # (P, 2) float64
    rot = grid.double()[:, :2, :]                                          # (R, 2, 3)
    pos = torch.einsum("pi,rij->rpj", k * D, rot).reshape(-1, 3).cpu()     # (R·P, 3) x, y, z voxels
    # the DC pixel is its own mirror: insert it once
    scale = torch.where((k == 0).all(-1), 0.5, 1.0).to(torch.float64).cpu()
    scale = scale.expand(grid.shape[0], -1).reshape(-1, 1)                 # (R·P, 1)
    M, W = acc.M.cpu(), acc.W.cpu()
    vals = torch.stack([M[0].real, M[0].imag, W[0], M[1].real, M[1].imag, W[1]], dim=-1)
    vals = vals.reshape(-1, 6).double() * scale                            # (R·P, 6)
    conj = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    out = torch.zeros((D ** 3, 6), dtype=torch.float64)
    for sgn in (1.0, -1.0):
        q = sgn * pos + D / 2
        base = torch.floor(q)
        f = q - base
        base = base.long()
        v = vals if sgn > 0 else vals * conj
        for dz in (0, 1):
            wz = f[:, 2] if dz else 1 - f[:, 2]
            for dy in (0, 1):
                wzy = wz * (f[:, 1] if dy else 1 - f[:, 1])
                for dx in (0, 1):
                    w = wzy * (f[:, 0] if dx else 1 - f[:, 0])
                    idx = ((base[:, 2] + dz) * D + base[:, 1] + dy) * D + base[:, 0] + dx
                    out.index_add_(0, idx, v * w[:, None])
    out = out.reshape(D, D, D, 6).numpy()
    return (out[..., 0] + 1j * out[..., 1], out[..., 2].copy(), out[..., 3] + 1j * out[..., 4],
            out[..., 5].copy())
