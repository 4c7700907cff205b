"""Protein-like test objects: pseudo-atomic models, their heterogeneity, and rendering to density maps.

The simulator needs ground truth that looks like protein at 5–15 Å — compact globular domains with rod-like
helices, not a few smooth blobs — so that resolution and heterogeneity metrics mean what they mean on real
data. A procedural model is a chain of Cα-like pseudo-atoms (one per residue, 3.8 Å apart, alternating
α-helices and loops) folded inside each domain's sphere; a domain's radius follows from its residue count
at protein packing density, so an n-residue model has a realistic size in Å. An atomic model file
(PDB/mmCIF, read with gemmi) is the other source, with atoms weighted by their atomic number.

Heterogeneity is expressed on the model, before rendering:

- continuous: a `Hinge` rotates one domain about an axis through a hinge point by θ(c), c ∈ [0, 1] the
  reaction coordinate (the paper rotated a dihedral angle over 1.5 rad);
- compositional: state k holds the core (domain 0) and subunits 1..k (e.g. core, core+A, core+A+B).

Rendering sums Gaussians of σ = resolution/(π√2) (Chimera molmap's convention, the paper's ground-truth
maps) integrated over each voxel; separable in x, y, z, so a map costs one matrix product per atom chunk.
All coordinates are in Å with the origin at the box centre (voxel D//2), axes (x, y, z) → array [z, y, x].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drgn_core.errors import InputError

RESIDUE_VOLUME_A3 = 136.0  # an average residue (~110 Da) at protein density (~0.81 Da/Å³)
CA_STEP_A = 3.8  # Cα–Cα distance
HELIX_RISE_A, HELIX_RADIUS_A, HELIX_TWIST_RAD = 1.5, 2.3, math.radians(100.0)
SIGMA_PER_RESOLUTION = 1.0 / (math.pi * math.sqrt(2.0))  # Chimera molmap: σ = resolution · 0.225
CONTACT = 0.9  # neighbouring domains sit at 0.9·(R1 + R2): a packed interface, not two touching balls


@dataclass
class AtomicModel:
    """Atoms (n, 3) in Å, their scattering weights, and the domain (or chain) each belongs to."""

    coords: np.ndarray  # (n, 3) float64, (x, y, z) Å, origin at the box centre
    weights: np.ndarray  # (n,) float64
    domains: np.ndarray  # (n,) int64, index into domain_names
    domain_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def n_domains(self) -> int:
        return len(self.domain_names)

    def select(self, mask: np.ndarray) -> AtomicModel:
        """The atoms where `mask` is true (domain labels and names kept)."""
        return AtomicModel(self.coords[mask], self.weights[mask], self.domains[mask], self.domain_names)

    def with_coords(self, coords: np.ndarray) -> AtomicModel:
        xyz = np.asarray(coords, dtype=np.float64)
        return AtomicModel(xyz, self.weights, self.domains, self.domain_names)

    def centre_of_mass(self) -> np.ndarray:
        return np.average(self.coords, axis=0, weights=self.weights)

    def centred(self) -> AtomicModel:
        """Translated so the weighted centre of mass is at the origin (the box centre)."""
        return self.with_coords(self.coords - self.centre_of_mass())

    def max_radius(self) -> float:
        """Largest distance of an atom from the origin (Å)."""
        return float(np.linalg.norm(self.coords, axis=1).max()) if len(self) else 0.0


def rotation_about_axis(axis: np.ndarray, angle: float) -> np.ndarray:
    """3×3 rotation by `angle` (rad, right-handed) about the unit vector `axis` (Rodrigues' formula)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    K = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * (K @ K)


@dataclass
class Hinge:
    """Rotation of one domain about an axis through `point`: θ(c) = angle_range · (c - 1/2), c ∈ [0, 1].

    Centring the range on c = 1/2 keeps the mid conformation the one the model was built in, so the
    object stays centred in the box across the whole motion.
    """

    domain: int
    point: np.ndarray  # (3,) Å
    axis: np.ndarray  # (3,) unit vector
    angle_range: float = 1.5  # rad, the paper's total range

    def angle(self, c: float) -> float:
        return self.angle_range * (float(c) - 0.5)

    def apply(self, model: AtomicModel, c: float) -> AtomicModel:
        """The model at reaction coordinate c: only atoms of `domain` move."""
        R = rotation_about_axis(self.axis, self.angle(c))
        coords = model.coords.copy()
        m = model.domains == self.domain
        coords[m] = (coords[m] - self.point) @ R.T + self.point
        return model.with_coords(coords)

    def to_dict(self) -> dict:
        return {"domain": int(self.domain), "point_A": [round(float(v), 4) for v in self.point],
                "axis": [round(float(v), 6) for v in self.axis], "angle_range_rad": float(self.angle_range)}


# ---- procedural models -----------------------------------------------------------------------------

def domain_radius(n_residues: int) -> float:
    """Radius (Å) of a sphere holding n residues at protein density."""
    return (3.0 * n_residues * RESIDUE_VOLUME_A3 / (4.0 * math.pi)) ** (1.0 / 3.0)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _perpendicular_basis(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    helper = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = _unit(np.cross(u, helper))
    return e1, np.cross(u, e1)


def fold_chain(n: int, centre: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) Cα-like positions of a chain of helices (8–19 residues) and loops (2–6) inside a sphere.

    Each segment is tried in a few random directions, biased towards the centre as the chain nears the
    surface, and kept only if it stays inside: the result fills the sphere like a globular domain, with
    the rod-shaped helices that give density maps their protein-like texture at 5–10 Å.
    """
    centre = np.asarray(centre, dtype=np.float64)
    out = np.empty((n, 3))
    pos = centre + rng.normal(size=3) * radius * 0.2
    direction = _unit(rng.normal(size=3))
    i = 0
    while i < n:
        placed = 0
        if rng.random() < 0.6:  # helix
            L = min(int(rng.integers(8, 20)), n - i)
            j = np.arange(L)
            for _ in range(12):
                u = _unit(rng.normal(size=3) + 1.5 * (centre - pos) / radius)
                e1, e2 = _perpendicular_basis(u)
                start = pos + CA_STEP_A * u
                seg = (start + np.outer(j * HELIX_RISE_A, u)
                       + HELIX_RADIUS_A * (np.outer(np.cos(j * HELIX_TWIST_RAD) - 1, e1)
                                           + np.outer(np.sin(j * HELIX_TWIST_RAD), e2)))
                if np.all(np.linalg.norm(seg - centre, axis=1) <= radius):
                    out[i : i + L] = seg
                    placed = L
                    direction = u
                    break
        if not placed:  # loop: a persistent random walk
            L = min(int(rng.integers(2, 7)), n - i)
            for k in range(L):
                for _ in range(20):
                    d = _unit(direction + 0.9 * rng.normal(size=3))
                    nxt = pos + CA_STEP_A * d
                    if np.linalg.norm(nxt - centre) <= radius:
                        break
                else:  # boxed in: step towards the centre
                    d = _unit(centre - pos + 1e-9)
                    nxt = pos + CA_STEP_A * d
                out[i + k] = nxt
                pos, direction = nxt, d
            placed = L
        i += placed
        pos = out[i - 1]
    return out


def _split(n: int, fractions: list[float]) -> list[int]:
    """Integer counts summing to n in the given proportions (largest remainders)."""
    f = np.asarray(fractions, dtype=np.float64)
    f = f / f.sum()
    raw = f * n
    counts = np.floor(raw).astype(int)
    for k in np.argsort(-(raw - counts))[: n - counts.sum()]:
        counts[k] += 1
    return [max(int(c), 1) for c in counts]


def _assemble(counts: list[int], centres: list[np.ndarray], names: tuple[str, ...],
              rng: np.random.Generator) -> AtomicModel:
    coords, domains = [], []
    for d, (nd, c) in enumerate(zip(counts, centres)):
        coords.append(fold_chain(nd, c, domain_radius(nd), rng))
        domains.append(np.full(nd, d, dtype=np.int64))
    xyz = np.concatenate(coords)
    return AtomicModel(xyz, np.ones(len(xyz)), np.concatenate(domains), names)


def hinge_phantom(n_atoms: int, rng: np.random.Generator, angle_range: float = 1.5
                  ) -> tuple[AtomicModel, Hinge]:
    """A three-domain protein whose 'arm' swings about a hinge on the 'body', with a 'base' on top.

    Domain shares 40/25/35 %. The arm's hinge sits on the body's surface; the swing axis is tilted out of
    the body–arm plane so the motion is not planar in any view. The base direction was chosen (by a scan
    over directions) to make the complex as compact as possible while the arm clears it by the sum of
    their radii over the whole ±0.75 rad swing. The model is centred on its mid-conformation centre of
    mass; 3,000 residues span a sphere of radius ≈ 70 Å.
    """
    counts = _split(n_atoms, [0.40, 0.25, 0.35])
    R0, R1, R2 = (domain_radius(c) for c in counts)
    c0 = np.zeros(3)
    c1 = CONTACT * (R0 + R1) * _unit(np.array([0.40, 0.22, 0.89]))
    hinge_point = CONTACT * R0 * np.array([1.0, 0.0, 0.0])
    c2 = hinge_point + CONTACT * R2 * np.array([1.0, 0.0, 0.0])
    model = _assemble(counts, [c0, c1, c2], ("body", "base", "arm"), rng)
    com = model.centre_of_mass()
    model = model.with_coords(model.coords - com)
    hinge = Hinge(domain=2, point=hinge_point - com, axis=_unit(np.array([0.0, 0.3, 1.0])),
                  angle_range=angle_range)
    return model, hinge


def compositional_phantom(n_atoms: int, n_states: int, rng: np.random.Generator) -> AtomicModel:
    """A core (half the atoms) and n_states - 1 subunits packed around it; state k = core + subunits 1..k.

    Subunits sit around the core in one band (120° apart for two or three), so the assembled complex is
    compact. All states share one frame, centred on the complete complex's centre of mass, as subunits
    cut from one structure do.
    """
    n_sub = n_states - 1
    fractions = [0.5] + [0.5 / n_sub] * n_sub if n_sub else [1.0]
    counts = _split(n_atoms, fractions)
    Rc = domain_radius(counts[0])
    centres = [np.zeros(3)]
    step = 2 * math.pi / max(3, n_sub)
    for k in range(n_sub):
        Rs = domain_radius(counts[k + 1])
        phi = k * step
        d = _unit(np.array([math.cos(phi), math.sin(phi), 0.35 * (-1) ** k]))
        centres.append(CONTACT * (Rc + Rs) * d)
    names = ("core", *(f"subunit{k + 1}" for k in range(n_sub)))
    return _assemble(counts, centres, names, rng).centred()


def random_phantom(n_atoms: int, rng: np.random.Generator) -> AtomicModel:
    """An unrelated object for junk: 2–4 domains of random sizes packed in a random arrangement."""
    n_dom = int(rng.integers(2, 5))
    counts = _split(n_atoms, list(rng.dirichlet(np.full(n_dom, 2.0))))
    radii = [domain_radius(c) for c in counts]
    centres = [np.zeros(3)]
    for d in range(1, n_dom):
        for _ in range(50):
            parent = int(rng.integers(0, d))
            c = centres[parent] + CONTACT * (radii[parent] + radii[d]) * _unit(rng.normal(size=3))
            if all(np.linalg.norm(c - centres[e]) >= CONTACT * (radii[e] + radii[d]) for e in range(d)):
                break
        centres.append(c)
    names = tuple(f"domain{k}" for k in range(n_dom))
    return _assemble(counts, centres, names, rng).centred()


# ---- atomic model files ----------------------------------------------------------------------------

def load_atomic_model(path: str | os.PathLike) -> AtomicModel:
    """Atoms of the first model in a PDB/mmCIF file, weighted by atomic number × occupancy, centred.

    Waters are dropped (bulk solvent is not part of a particle); each chain becomes one domain.
    """
    import gemmi

    path = Path(path)
    if not path.exists():
        raise InputError("no such file (expected an atomic model, .pdb or .cif)", path)
    try:
        st = gemmi.read_structure(str(path))
    except Exception as e:  # gemmi raises RuntimeError/ValueError with a reason
        raise InputError(f"cannot read as PDB/mmCIF ({type(e).__name__}: {e})", path) from None
    st.remove_waters()
    if len(st) == 0:
        raise InputError("contains no models", path)
    coords, weights, domains, names = [], [], [], []
    for chain in st[0]:
        n_before = len(coords)
        for residue in chain:
            for atom in residue:
                z = atom.element.atomic_number
                if z <= 0:
                    continue
                coords.append((atom.pos.x, atom.pos.y, atom.pos.z))
                weights.append(z * atom.occ)
        if len(coords) > n_before:
            domains.extend([len(names)] * (len(coords) - n_before))
            names.append(chain.name)
    if not coords or sum(weights) <= 0:
        raise InputError("contains no atoms with a known element and non-zero occupancy", path)
    model = AtomicModel(np.array(coords, dtype=np.float64), np.array(weights, dtype=np.float64),
                        np.array(domains, dtype=np.int64), tuple(names))
    return model.centred()


def hinge_from_model(model: AtomicModel, angle_range: float = 1.5, moving_fraction: float = 0.3
                     ) -> tuple[AtomicModel, Hinge]:
    """A hinge for an arbitrary model: its outer `moving_fraction` of atoms along the longest principal
    axis swing about the smallest-variance axis, through the centre of the atoms at the cut.

    Domains are relabelled 0 = fixed, 1 = moving. Any model has this motion, which is all a simulated
    continuous dataset needs (the paper likewise rotated one dihedral of a hypothetical complex).
    """
    x = model.coords - model.centre_of_mass()
    _, vecs = np.linalg.eigh(np.cov(x.T, aweights=model.weights))
    long_axis, short_axis = vecs[:, 2], vecs[:, 0]
    t = x @ long_axis
    cut = np.quantile(t, 1.0 - moving_fraction)
    moving = t > cut
    slab = np.abs(t - cut) < max(3.0, 0.05 * (t.max() - t.min()))
    point = model.coords[slab].mean(axis=0) if slab.any() else model.coords[moving].mean(axis=0)
    relabelled = AtomicModel(model.coords, model.weights, moving.astype(np.int64), ("fixed", "moving"))
    return relabelled, Hinge(1, point, _unit(short_axis), angle_range)


def compositional_from_model(model: AtomicModel, n_states: int, path: str | os.PathLike | None = None
                             ) -> AtomicModel:
    """States from chains: the last n_states - 1 chains are added one by one to a core of the others."""
    n_chain = model.n_domains
    if n_chain < n_states:
        raise InputError(f"has {n_chain} chain(s); compositional heterogeneity with {n_states} states needs "
                         f"at least {n_states} (a core plus one chain per added subunit)", path)
    first_sub = n_chain - (n_states - 1)
    domains = np.where(model.domains < first_sub, 0, model.domains - first_sub + 1)
    names = ("core:" + ",".join(model.domain_names[:first_sub]), *model.domain_names[first_sub:])
    return AtomicModel(model.coords, model.weights, domains.astype(np.int64), names)


# ---- rendering -------------------------------------------------------------------------------------

def gaussian_sigma(resolution: float) -> float:
    """σ (Å) of the Gaussian that stands for one atom in a map at `resolution` Å."""
    return resolution * SIGMA_PER_RESOLUTION


def _voxel_profiles(pos: np.ndarray, start: np.ndarray, n: int, sigma: float) -> np.ndarray:
    """(a, 3, n) integrals of unit 1D Gaussians centred at `pos` (a, 3) over voxels start..start+n-1."""
    from scipy.special import erf

    lo = start[:, :, None] + np.arange(n) - 0.5 - pos[:, :, None]
    scale = 1.0 / (sigma * math.sqrt(2.0))
    return (0.5 * (erf((lo + 1.0) * scale) - erf(lo * scale))).astype(np.float32)


def render_density(model: AtomicModel, D: int, apix: float, resolution: float) -> np.ndarray:
    """(D, D, D) float32 density [z, y, x]: Σ_atoms w · Gaussian(σ = resolution/(π√2)), voxel-integrated.

    Each Gaussian is integrated over its voxel (differences of erf along each axis), so total mass is kept
    even when σ is below a voxel, and the map has no aliasing from narrow atoms. The Gaussian is separable,
    w · gz[z] gy[y] gx[x]: narrow ones (the usual case, σ ≈ 0.5 px) are added as small cubes of ±(4σ + 1)
    voxels with one bincount; wide ones, whose cubes would rival the box, as one (D², a) × (a, D) product.
    """
    sigma = gaussian_sigma(resolution) / apix
    p = model.coords / apix + D // 2  # (x, y, z) in voxel indices
    w = model.weights.astype(np.float32)
    half = math.ceil(4.0 * sigma + 1.0)
    K = 2 * half
    if 300 * K**3 >= D**3:  # per voxel, a cube costs a few hundred times a GEMM multiply-add
        vol = np.zeros((D * D, D), dtype=np.float32)
        chunk = max(1, (1 << 22) // (D * D))
        for a in range(0, len(p), chunk):
            pa = p[a : a + chunk]
            g = _voxel_profiles(pa, np.zeros((len(pa), 3), dtype=np.int64), D, sigma)
            gzy = (w[a : a + len(g), None] * g[:, 2])[:, :, None] * g[:, 1][:, None, :]
            vol += gzy.reshape(len(g), D * D).T @ g[:, 0]
        return vol.reshape(D, D, D)
    vol = np.zeros(D**3, dtype=np.float64)
    offs = np.arange(K)
    chunk = max(1, (1 << 21) // K**3)
    for a in range(0, len(p), chunk):
        pa = p[a : a + chunk]
        start = np.floor(pa).astype(np.int64) - half + 1  # window covers pos ± half voxels
        g = _voxel_profiles(pa, start, K, sigma)
        vals = (w[a : a + chunk, None, None, None] * g[:, 2, :, None, None] * g[:, 1, None, :, None]
                * g[:, 0, None, None, :])
        ix, iy, iz = (start[:, c, None] + offs for c in range(3))
        inside = (((iz >= 0) & (iz < D))[:, :, None, None] & ((iy >= 0) & (iy < D))[:, None, :, None]
                  & ((ix >= 0) & (ix < D))[:, None, None, :])
        lin = ((iz[:, :, None, None] * D + iy[:, None, :, None]) * D + ix[:, None, None, :])
        vol += np.bincount(lin[inside], weights=vals[inside], minlength=D**3)
    return vol.reshape(D, D, D).astype(np.float32)


def ice_blobs(W: int, rng: np.random.Generator, extent: int | None = None, n_blobs: int | None = None
              ) -> np.ndarray:
    """(W, W) ice-like junk: 1–3 large, soft, positive Gaussian blobs on a W×W canvas.

    Sizes and positions scale with `extent` (the particle box, default W): σ 0.12–0.3 of it, centres
    within ±0.35 of it from the canvas centre, so blobs often run off the box, as contamination does.
    """
    E = W if extent is None else extent
    k = int(rng.integers(1, 4)) if n_blobs is None else n_blobs
    g = np.arange(W) - W // 2
    y, x = np.meshgrid(g, g, indexing="ij")
    img = np.zeros((W, W))
    for _ in range(k):
        cx, cy = rng.uniform(-0.35, 0.35, 2) * E
        s = rng.uniform(0.12, 0.3) * E
        img += rng.uniform(0.5, 1.0) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    return img
