"""Maps on demand: decode with the run's decoder, keep them in a cache, mesh them, save them as .mrc.

A map is identified by the exact float32 bytes of its latent point and its box size, so asking twice for
the same point (a k-means centre clicked again, a selection unchanged) costs a dictionary look-up, not a
decode. The cache holds at most `max_bytes` of maps and drops the least recently used first.

Isosurfaces are computed here (marching cubes, scikit-image) and sent as flat binary arrays, so the
browser only draws triangles; maps above 96³ are meshed at every second voxel for display, which keeps a
D = 128 surface to a few hundred thousand triangles. Saved maps are the full decoded map, not the mesh.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drgn_core.errors import DrgnError
from drgn_core.explore import runlink
from drgn_core.io.mrc import write_mrc


@dataclass
class Map:
    id: str
    z: np.ndarray          # (zdim,) float32
    volume: np.ndarray     # (D, D, D) float32, [z, y, x]
    apix: float
    label: str
    exact: bool = True     # decoded in float32 (False: bf16 autocast, for viewing only)
    decoded: bool = True   # False: read from a file (a landscape state's mean map), saved as it is

    def info(self) -> dict:
        v = self.volume
        return {"id": self.id, "z": [float(x) for x in self.z], "D": int(v.shape[-1]), "apix": self.apix,
                "label": self.label, "exact": self.exact, "min": float(v.min()), "max": float(v.max()),
                "level": default_level(v)}


def default_level(vol: np.ndarray) -> float:
    """ChimeraX-like first level: the 99th percentile of the voxels (the densest 1 % enclosed)."""
    return float(np.percentile(vol, 99.0))


class MapCache:
    """Decoded maps of one run, by (latent bytes, D); thread-safe; least recently used dropped first."""

    def __init__(self, run_dir: Path, device: str = "cpu", max_bytes: int = 1 << 30):
        self.run_dir = Path(run_dir)
        self.device = device
        self.max_bytes = max_bytes
        self._maps: OrderedDict[str, Map] = OrderedDict()
        self._lock = threading.Lock()
        self.decoded = 0           # number of real decodes (the cache's effect is testable)

    @staticmethod
    def key(z: np.ndarray, D: int | None) -> str:
        zb = np.ascontiguousarray(z, dtype=np.float32).tobytes()
        return hashlib.sha1(zb + str(D).encode()).hexdigest()[:16]

    def get(self, map_id: str) -> Map:
        with self._lock:
            if map_id not in self._maps:
                raise DrgnError(f"no map {map_id!r} in this session (decode it first)")
            self._maps.move_to_end(map_id)
            return self._maps[map_id]

    def decode(self, z: np.ndarray, label: str, D: int | None = None, exact: bool = True) -> Map:
        """The map at latent point z (decoded once, then served from the cache).

        `exact=False` is for viewing: on a CPU with native bfloat16 (and on a GPU) the decoder runs under
        bf16 autocast, 1.5x faster on two cores at a relative error of ~0.5 % of the map's maximum, which
        an isosurface does not show. Saved maps are always decoded exactly (float32), as `drgn volumes`.
        """
        z = np.asarray(z, dtype=np.float32).reshape(-1)
        fast = not exact and runlink.fast_decode_available(self.device)
        k = self.key(z, D) + ("-bf16" if fast else "")
        with self._lock:  # one decode at a time: the model is shared and a second decode would only queue
            if k in self._maps:
                self._maps.move_to_end(k)
                return self._maps[k]
            if fast:
                import torch

                with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16):
                    vols, apix = runlink.decode_maps(self.run_dir, z[None], D=D, device=self.device)
            else:
                vols, apix = runlink.decode_maps(self.run_dir, z[None], D=D, device=self.device)
            self.decoded += 1
            m = Map(k, z, vols[0].astype(np.float32), float(apix), label, exact=not fast)
            self._maps[k] = m
            while sum(x.volume.nbytes for x in self._maps.values()) > self.max_bytes and len(self._maps) > 1:
                self._maps.popitem(last=False)
            return m


def add_map(cache: MapCache, vol: np.ndarray, apix: float, label: str, z: np.ndarray) -> Map:
    """Put a map that was not decoded here (a landscape state's mean map) into the session's cache."""
    key = hashlib.sha1(label.encode() + np.ascontiguousarray(vol[::4, ::4, ::4]).tobytes()).hexdigest()[:16]
    m = Map(key, np.asarray(z, np.float32), np.asarray(vol, np.float32), float(apix), label, decoded=False)
    with cache._lock:
        cache._maps[key] = m
        cache._maps.move_to_end(key)
    return m


def mesh_bytes(m: Map, level: float) -> bytes:
    """Isosurface of map `m` at `level` as bytes: uint32 n_vertices, uint32 n_faces, float32 vertices
    (n, 3) in Å from the box centre (x, y, z), float32 normals (n, 3), uint32 faces (f, 3)."""
    from skimage.measure import marching_cubes

    vol = m.volume
    lo, hi = float(vol.min()), float(vol.max())
    if not lo < level < hi:
        raise DrgnError(f"level {level:g} lies outside the map's values ({lo:.4g} … {hi:.4g})")
    step = 2 if vol.shape[-1] > 96 else 1
    verts, faces, normals, _ = marching_cubes(vol, level=level, step_size=step, allow_degenerate=False)
    D = vol.shape[-1]
    xyz = (verts[:, ::-1] - D // 2) * m.apix           # [z, y, x] voxel → (x, y, z) Å
    head = np.array([len(xyz), len(faces)], dtype=np.uint32)
    return (head.tobytes() + xyz.astype(np.float32).tobytes() + normals[:, ::-1].astype(np.float32).tobytes()
            + faces.astype(np.uint32).tobytes())


def save_map(m: Map, path: Path) -> Path:
    """Write the full map as .mrc with its voxel size."""
    write_mrc(path, m.volume, m.apix)
    return path
