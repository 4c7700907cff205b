"""Particle data for training and encoding: prepared once, then served in batches.

(docs/architecture.md § Data path and scale.) Preparation turns each image into what the model compares
against, once per dataset rather than per batch: the centred 2D transform, gathered on the model's half
lattice (`models.HalfLattice`), multiplied by exp(-2πi k·t) to undo the particle's shift t
(docs/architecture.md § Shifts: t is the RELION re-centring origin in px of this box), and divided by one
global normalisation scale. Shifting the data instead of the model's slice
gives the same loss (the phase ramp has modulus 1) and hands the encoder centred particles.

Two ways to hold the prepared data, chosen by size (`mode='auto'`):
- memory: one (N, P, 2) tensor — float32 in RAM on the CPU, float16 on the GPU when it fits;
- stream: contiguous chunks of the stack are read (plain sequential reads, not through the memory map, so
  they do not stay in the process's memory), prepared and handed over by a background thread (pinned
  memory for a GPU), for stacks larger than memory. The epoch order is shuffled across and within chunks:
  chunks in random order, taken `mix` at a time, and the images of those `mix` chunks in random order
  together, so that a batch mixes particles from distant parts of the stack (stacks are usually ordered
  by micrograph) while every read stays a long contiguous one. With a cache folder (`drgn train`'s
  default: RUN/stream_cache), the images are prepared once, in one sequential pass before training, into
  a cache on disk in the dtype served (`drgn_core.io.prepared_cache`), and every epoch then reads prepared
  values: the per-epoch work of the background thread drops from read + transform to read, and the values
  are bit-identical to the in-memory mode's (both prepare in the same aligned blocks of PREP_BLOCK).
Per-image random disk reads never happen in either mode.
"""

from __future__ import annotations

import mmap
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from drgn_core.ctf import ctf_from_params
from drgn_core.errors import InputError
from drgn_core.io.prepared_cache import PreparedCache, array_digest
from drgn_core.io.stack import file_sha256, open_stack, sidecar_path
from drgn_core.io.table import ParticleTable
from drgn_core.models import HalfLattice
from drgn_core.progress import progress_bar

NORM_SAMPLE = 1000  # images used to estimate the global normalisation scale
CHUNK_BYTES = 8 * 2**20  # prepared bytes of one streamed chunk when its size is automatic (chunk=0)
PREP_BLOCK = 256  # images transformed at once: bounds the FFT's temporaries whatever the chunk
PREP_VERSION = 1  # part of a prepared-image cache's key: raise it when Preparer's arithmetic changes


# ---- the stack ----------------------------------------------------------------------------------------
@dataclass
class ParticleSource:
    """Images of a dataset at one box size; row i is row i of the canonical table."""

    images: np.ndarray          # (n, D, D) read-only memory map
    D: int
    apix: float
    path: Path
    signs: np.ndarray | None    # (n,) to multiply rows by (raw stacks only); None when already applied


def open_particles(stack_path: str | os.PathLike, table: ParticleTable) -> ParticleSource:
    """Open the stack the table's rows refer to, checking that the two belong together.

    A `drgn downsample` stack has a `.json` sidecar giving D and the pixel size (contrast already
    applied). A stack without one is accepted when its box equals the table's own box (e.g. the simulator's
    particles.mrcs): its pixel size is the table's and the table's image signs are applied on reading.
    `io.stack.open_stack` checks the row count and the provenance against the table.
    """
    path = Path(stack_path)
    if not path.exists():
        raise InputError("no such particle stack", path)
    st = open_stack(path, table)
    if st.D % 2:
        raise InputError(f"images are {st.D} px; drgnflow needs an even box (make it with drgn downsample)",
                         path)
    signs = None
    if not sidecar_path(path).is_file():
        s = table.image_signs()
        signs = None if np.all(s == 1) else s.astype(np.float32)
    return ParticleSource(st.images, int(st.D), float(st.apix), path, signs)


def read_rows(source: ParticleSource, rows: np.ndarray) -> np.ndarray:
    """float32 (len(rows), D, D) for table rows: one read per run of consecutive rows (`read_span`)."""
    rows = np.asarray(rows)
    if not len(rows):
        return np.zeros((0, source.D, source.D), np.float32)
    if _file_layout(source.images) is not None:
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
        x = np.concatenate([read_span(source, int(r[0]), int(r[-1]) + 1) for r in runs]).astype(np.float32,
                                                                                                copy=False)
    elif np.all(np.diff(rows) == 1):
        x = np.array(source.images[rows[0]:rows[-1] + 1], dtype=np.float32)
    else:
        x = np.array(source.images[rows], dtype=np.float32)
    if source.signs is not None:
        x = x * source.signs[rows, None, None]
    return x


def _file_layout(images: np.ndarray) -> tuple[str, int] | None:
    """(file name, byte offset of row 0) when `images` is a whole, C-ordered memory map of one file, so
    that rows can be read with plain file reads; None otherwise (then rows are sliced from the map)."""
    if not isinstance(images, np.memmap) or not images.flags["C_CONTIGUOUS"] or images.filename is None:
        return None
    base = images.base
    if not isinstance(base, mmap.mmap):
        return None
    start = np.frombuffer(base, dtype=np.uint8).__array_interface__["data"][0]
    here = images.__array_interface__["data"][0]
    if here - start != images.offset % mmap.ALLOCATIONGRANULARITY:  # a view into the map, not its start
        return None
    return str(images.filename), int(images.offset)


def read_span(source: ParticleSource, lo: int, hi: int) -> np.ndarray:
    """Stack rows lo..hi-1 as one sequential read, without mapping them into this process.

    Reading a memory map makes every page it touches part of the process's resident memory until the
    kernel needs it back, so an epoch streamed through the map would show the whole stack in the RSS
    (and count against a cgroup's limit as mapped memory). A plain read goes through the page cache
    only: the process keeps just the chunk it is preparing.
    """
    layout = _file_layout(source.images)
    if layout is None:
        return np.asarray(source.images[lo:hi])
    fname, offset = layout
    per = int(np.prod(source.images.shape[1:]))
    item = source.images.dtype.itemsize
    with open(fname, "rb") as f:
        f.seek(offset + lo * per * item)
        x = np.fromfile(f, dtype=source.images.dtype, count=(hi - lo) * per)
    if x.size != (hi - lo) * per:
        raise InputError(f"ends before row {hi} (truncated stack?)", source.path)
    return x.reshape((hi - lo, *source.images.shape[1:]))


def read_chunk_rows(source: ParticleSource, rows: np.ndarray) -> np.ndarray:
    """float32 images of sorted table `rows` lying close together (one streamed chunk): one sequential
    read of the span they cover, then the rows picked out of it."""
    rows = np.asarray(rows)
    if not len(rows):
        return np.zeros((0, source.D, source.D), np.float32)
    block = read_span(source, int(rows[0]), int(rows[-1]) + 1)
    x = np.asarray(block[rows - rows[0]], dtype=np.float32)
    if source.signs is not None:
        x = x * source.signs[rows, None, None]
    return x


# ---- preparation --------------------------------------------------------------------------------------
class Preparer:
    """Image (b, D, D) + shift (b, 2) px → centred half-lattice transform (b, P, 2) / scale, float32."""

    def __init__(self, lattice: HalfLattice, norm_scale: float = 1.0):
        self.lattice = lattice
        self.scale = float(norm_scale)
        self.flat = torch.from_numpy(lattice.flat)
        self.coords = torch.from_numpy(lattice.coords)  # (P, 2) float64: phases stay exact

    def __call__(self, images: np.ndarray, shifts_px: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        b, D = x.shape[0], x.shape[-1]
        F = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1))), dim=(-2, -1))
        F = F.reshape(b, D * D)[:, self.flat]                               # (b, P) complex64
        t = torch.from_numpy(np.asarray(shifts_px, dtype=np.float64))         # (b, 2)
        phase = -2.0 * np.pi * (t @ self.coords.T)                            # (b, P): -2πi k·t
        F = F * torch.polar(torch.ones_like(phase), phase).to(F.dtype)
        return torch.view_as_real(F) / self.scale                            # (b, P, 2)


def estimate_norm_scale(source: ParticleSource, rows: np.ndarray, shifts_px: np.ndarray,
                        lattice: HalfLattice, seed: int, n_sample: int = NORM_SAMPLE) -> float:
    """RMS of the in-circle transform values of a random sample of images (the one global scale).

    The mean of |F|² over the full circle is computed from the half lattice with its weights. cryoDRGN
    likewise divides by one dataset-wide standard deviation of the transformed images.
    """
    rng = np.random.default_rng([seed, 0x5CA1E])
    pick = np.sort(rng.choice(len(rows), size=min(n_sample, len(rows)), replace=False))
    prep = Preparer(lattice, 1.0)
    w = torch.from_numpy(lattice.weights)
    total = 0.0
    for a in range(0, len(pick), 256):
        p = pick[a:a + 256]
        y = prep(read_rows(source, rows[p]), shifts_px[p]).double()
        total += float((y.pow(2).sum(-1) @ w).sum())
    scale = float(np.sqrt(total / (len(pick) * lattice.n_full)))
    if not np.isfinite(scale) or scale <= 0:
        raise InputError("images are all zero or not finite: cannot normalise them", source.path)
    return scale


# ---- batches ------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One minibatch on the training device."""

    pos: torch.Tensor   # (B,) positions into ParticleData.rows (CPU, int64)
    y: torch.Tensor     # (B, P, 2) float32 prepared transforms
    A: torch.Tensor     # (B, 3, 3) poses
    ctf: torch.Tensor   # (B, P) CTF on the half lattice
    lo: int = 0         # with several processes: where this slice starts in the global batch ...
    n_global: int = -1  # ... and the global batch's size (-1: the batch is the global batch)


def _return_freed_memory() -> None:
    """Have glibc serve every allocation of 1 MiB or more from its own mapping, given back on free.

    Streaming allocates and frees chunk-sized buffers continually, from two threads. glibc raises its
    mmap threshold after the first such buffer is freed (up to 32 MiB), and from then on serves them from
    per-thread heaps that it rarely returns to the system: measured on a 125 MiB stack, the resident set
    crept up by 110 MiB over an epoch, against 51 MiB with this setting. Elsewhere (not glibc) nothing
    is changed. Only streaming without the prepared-image cache sets it: it also makes every training step
    page-fault its own temporaries (an epoch 1.6x slower), and the cached path needs no large buffer
    outside `_mapped_empty`.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it also turns off its dynamic raising)
    except (OSError, AttributeError):
        pass


def _mapped_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in its own anonymous memory map, given back to the system when freed.

    Streamed segments (tens of MiB) are allocated in the background thread and freed in the training
    thread continually. From glibc's heaps they make the resident set creep up over an epoch; forcing
    every allocation of 1 MiB or more into its own map (`_return_freed_memory`) prevents that but makes
    every training step page-fault its temporaries too: measured 1.6x slower per epoch on the CPU
    (bench/README.md). Mapping only these buffers keeps both the memory bound and the speed.
    """
    n = int(np.prod(shape))
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, n * torch.empty((), dtype=dtype).element_size())
    return torch.frombuffer(buf, dtype=dtype, count=n).view(shape)  # the tensor keeps the map alive


def _take(pend: list[tuple[np.ndarray, torch.Tensor]], b: int, empty: tuple[int, ...], device: torch.device
          ) -> tuple[np.ndarray, torch.Tensor]:
    """Remove the first `b` images from the pending segments: (positions, prepared images)."""
    if b == 0:
        return np.zeros(0, np.int64), torch.empty(empty, device=device)
    pos, ys = [], []
    while b:
        seg, y = pend[0]
        t = min(b, len(seg))
        pos.append(seg[:t])
        ys.append(y[:t])
        if t == len(seg):
            pend.pop(0)
        else:
            pend[0] = (seg[t:], y[t:])
        b -= t
    return (pos[0], ys[0]) if len(pos) == 1 else (np.concatenate(pos), torch.cat(ys))


def _trim_heaps() -> None:
    """Give free memory in glibc's heaps back to the system (malloc_trim; nothing elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _bytes_available(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


class ParticleData:
    """Prepared images, poses and CTF parameters for a set of table rows, served as batches.

    `rows` (N,) are canonical table rows; batch positions index into them. `mode` is 'auto', 'memory' or
    'stream'; `chunk` is the number of images read in one go (0: as many as make 8 MiB prepared), and
    `mix` the number of chunks whose images are shuffled together (streamed memory holds about three
    times chunk × mix prepared images).

    Streamed data with a `cache_dir` are prepared once into a prepared-image cache there (reused when it
    already holds one for the same data; `stack_checksum` is the stack's SHA-256 when the caller knows
    it, else it is computed). `share` = (rank, world): with several processes each builds its share of
    the cache's parts first, then any still missing. `prune` removes the other caches in `cache_dir` (a
    folder only this run uses). Without enough free disk the data stream uncached, with a warning.
    """

    def __init__(self, source: ParticleSource, table: ParticleTable, rows: np.ndarray, lattice: HalfLattice,
                 norm_scale: float, device: torch.device, mode: str = "auto", chunk: int = 4096,
                 progress: bool = True, mix: int = 1, cache_dir: str | os.PathLike | None = None,
                 stack_checksum: str | None = None, share: tuple[int, int] = (0, 1), prune: bool = False):
        self.source, self.lattice, self.device = source, lattice, device
        self.rows = np.asarray(rows, dtype=np.int64)
        self.n = len(self.rows)
        self.chunk = int(chunk) if chunk > 0 else max(64, CHUNK_BYTES // (lattice.P * 2 * 4))
        self.mix = max(1, int(mix))
        self.progress = progress
        sub = table.subset(self.rows)
        self.shifts_px = sub.shifts_px(source.apix)                                    # (N, 2) float64
        self.A = torch.from_numpy(sub.poses()).float().to(device)                      # (N, 3, 3)
        self.ctf_params = torch.from_numpy(sub.ctf_params(source.apix)).float().to(device)  # (N, 9)
        self.coords = torch.from_numpy(lattice.coords).float().to(device)              # (P, 2)
        self.prep = Preparer(lattice, norm_scale)
        self.mode, self.dtype = self._choose(mode)
        self.y: torch.Tensor | None = None
        self.cache: PreparedCache | None = None
        if self.mode == "memory":
            self.y = self._prepare_all()
        else:
            if cache_dir is not None:
                self.cache = self._open_cache(Path(cache_dir), stack_checksum, share, prune)
            if self.cache is None:  # preparing every epoch: its FFT temporaries churn glibc's heaps too
                _return_freed_memory()
            else:  # hand back what the cache's build left in the heaps
                _trim_heaps()

    def _choose(self, mode: str) -> tuple[str, torch.dtype]:
        per32 = self.n * self.lattice.P * 2 * 4
        avail = _bytes_available(self.device)
        if self.device.type == "cuda":  # fp16 on the GPU: half the memory, exact enough for noisy images
            fits = per32 // 2 < 0.6 * avail
            return ("memory" if mode == "memory" or (mode == "auto" and fits) else "stream"), torch.float16
        if mode == "memory" or (mode == "auto" and per32 < 0.5 * avail):
            return "memory", torch.float32
        if mode == "auto" and per32 // 2 < 0.5 * avail:
            return "memory", torch.float16
        return "stream", torch.float32

    def _prepared_blocks(self, lo: int, hi: int, read: int = 4 * PREP_BLOCK) -> Iterator[torch.Tensor]:
        """Prepared float32 (b, P, 2) of positions lo..hi-1 (lo a multiple of PREP_BLOCK) on the CPU, in
        blocks of PREP_BLOCK aligned at position 0, reading `read` images (a multiple of it) at a time.

        The in-memory mode and the cache both prepare through here: a transform's float32 result depends
        on the batch it was computed in (by ~1e-6), so the same blocks give the same bits.
        """
        for a in range(lo, hi, read):
            pos = np.arange(a, min(a + read, hi))
            x = read_rows(self.source, self.rows[pos])
            for b in range(0, len(pos), PREP_BLOCK):
                yield self.prep(x[b:b + PREP_BLOCK], self.shifts_px[pos[b:b + PREP_BLOCK]])

    def _prepare_all(self) -> torch.Tensor:
        y = torch.empty((self.n, self.lattice.P, 2), dtype=self.dtype, device=self.device)
        bar = progress_bar(total=self.n, desc="preparing images", unit="img", disable=not self.progress,
                   mininterval=1.0)
        a = 0
        for block in self._prepared_blocks(0, self.n):
            y[a:a + len(block)] = block.to(self.device, self.dtype)
            a += len(block)
            bar.update(len(block))
        bar.close()
        return y

    # ---- the prepared-image cache (streaming) -----------------------------------------------------------
    def _open_cache(self, root: Path, stack_checksum: str | None, share: tuple[int, int],
                    prune: bool) -> PreparedCache | None:
        """The complete cache of these data under `root`: reused, or built now (None: no room for it)."""
        fields = {"prep_version": PREP_VERSION, "prep_block": PREP_BLOCK, "D": self.source.D,
                  "stack_sha256": stack_checksum or file_sha256(self.source.path),
                  "stack_bytes": self.source.path.stat().st_size, "norm_scale": float(self.prep.scale).hex(),
                  "rows": array_digest(self.rows), "shifts_px": array_digest(self.shifts_px),
                  "signs": array_digest(self.source.signs)}
        np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        cache = PreparedCache(root, fields, self.n, self.lattice.P, np_dtype, PREP_BLOCK)
        if prune:
            cache.remove_others()
        missing = cache.missing()
        gib = cache.nbytes / 2**30
        if not missing:
            if self.progress:
                tqdm.write(f"prepared images: reusing the cache in {cache.folder} ({gib:.2f} GiB)",
                           file=sys.stderr)
            return cache
        need = sum(hi - lo for lo, hi in map(cache.part_range, missing)) * cache.image_bytes
        where = next(p for p in (cache.folder, *cache.folder.parents) if p.exists())
        free = shutil.disk_usage(where).free
        if need > free:
            tqdm.write(f"{root}: not enough free disk for the prepared-image cache ({need / 2**30:.2f} GiB "
                       f"needed, {free / 2**30:.2f} GiB free); every epoch prepares the images again "
                       "(--stream-cache DIR puts the cache elsewhere)", file=sys.stderr)
            return None
        try:
            cache.open_folder()
        except OSError as e:
            raise InputError(f"cannot write the prepared-image cache there ({e.strerror})", root) from None
        t0 = time.perf_counter()
        self._build_cache(cache, missing, share)
        if self.progress:
            tqdm.write(f"prepared images: cache of {gib:.2f} GiB written to {cache.folder} in "
                       f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return cache

    def _build_cache(self, cache: PreparedCache, missing: list[int], share: tuple[int, int]) -> None:
        """Prepare and write the missing parts: this process's share first (parts i with i % world ==
        rank), then the others' in turn, skipping any that another process finished meanwhile."""
        rank, world = share
        todo = sorted(missing, key=lambda i: ((i % world - rank) % world, i))
        read = max(PREP_BLOCK, self.chunk // PREP_BLOCK * PREP_BLOCK)
        total = sum(hi - lo for lo, hi in map(cache.part_range, todo))
        bar = progress_bar(total=total, desc="caching prepared images", unit="img", disable=not self.progress,
                   mininterval=1.0, file=sys.stderr)

        def blocks(lo: int, hi: int) -> Iterator[np.ndarray]:
            for y in self._prepared_blocks(lo, hi, read):
                bar.update(len(y))
                yield y.to(self.dtype).numpy()  # as the in-memory mode converts (fp16 for a GPU)

        for i in todo:
            lo, hi = cache.part_range(i)
            if cache._check_part(i):  # written by another process meanwhile
                bar.update(hi - lo)
                continue
            cache.write_part(i, blocks(lo, hi))
        bar.close()

    # ---- ordering ---------------------------------------------------------------------------------------
    def epoch_order(self, positions: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        """The visiting order of `positions` in an epoch, a function of (seed, epoch) only.

        Deriving it from (seed, epoch) rather than from a running generator is what lets a resumed run
        see exactly the batches an uninterrupted one would.
        """
        rng = np.random.default_rng([seed, epoch])
        positions = np.asarray(positions)
        if self.mode == "memory":
            return positions[rng.permutation(len(positions))]
        chunk_id = positions // self.chunk
        out = []
        ids = rng.permutation(np.unique(chunk_id))
        for g in range(0, len(ids), self.mix):  # (mix = 1: each chunk on its own, as before)
            members = positions[np.isin(chunk_id, ids[g:g + self.mix])]
            out.append(members[rng.permutation(len(members))])
        return np.concatenate(out) if out else positions[:0]

    # ---- serving ----------------------------------------------------------------------------------------
    def _make_batch(self, pos: np.ndarray, y: torch.Tensor, lo: int = 0, n_global: int = -1) -> Batch:
        p = torch.from_numpy(pos)
        pd = p.to(self.device)
        params = self.ctf_params[pd]
        ctf = ctf_from_params(self.coords, params)                      # (B, P)
        return Batch(p, y.to(self.device, torch.float32, non_blocking=True), self.A[pd], ctf, lo, n_global)

    @staticmethod
    def plan(order: np.ndarray, batch_size: int, rank: int = 0, world: int = 1
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(local order, local batch sizes, offsets in the global batch, global batch sizes) of one rank.

        The global batches are consecutive slices of `order`, the same for every world size; rank r takes
        the r-th of `world` near-equal contiguous pieces of each (possibly none, in a last short batch).
        """
        order = np.asarray(order)
        starts = np.arange(0, len(order), batch_size)
        tot = np.minimum(batch_size, len(order) - starts)
        if world == 1:
            return order, tot, np.zeros_like(tot), tot
        # np.array_split's pieces: the first (tot % world) are one longer
        base, extra = tot // world, tot % world
        lo = rank * base + np.minimum(rank, extra)
        hi = lo + base + (rank < extra)
        local = np.concatenate([order[s + a:s + b] for s, a, b in zip(starts, lo, hi)]) if len(starts) \
            else order[:0]
        return local, hi - lo, lo, tot

    def batches(self, order: np.ndarray, batch_size: int, start: int = 0, rank: int = 0, world: int = 1
                ) -> Iterator[Batch]:
        """Batches of `batch_size` following `order`, beginning at entry `start` (to resume mid-epoch).

        With `world` > 1 processes, global batches are cut from `order` as for one process and this rank
        receives its slice of each (`plan`): the same optimisation for any number of processes.
        """
        local, sizes, los, tots = self.plan(np.asarray(order)[start:], batch_size, rank, world)
        n_glob = tots if world > 1 else np.full_like(tots, -1)
        if self.mode == "memory":
            at = 0
            for b, lo, ng in zip(sizes, los, n_glob):
                pos = local[at:at + b]
                at += b
                yield self._make_batch(pos, self.y[torch.from_numpy(pos).to(self.device)], int(lo), int(ng))
            return
        yield from self._stream(local, sizes, los, n_glob)

    def _segments(self, order: np.ndarray) -> list[np.ndarray]:
        """Split an order into consecutive runs that touch at most `mix` chunks each (the read units).

        epoch_order's groups come out whole; a run resumed mid-group, or one rank's share of the order,
        is cut the same way. Only memory depends on the cut: batches follow `order` whatever it is.
        """
        if not len(order):
            return []
        cuts, seen = [], set()
        for i, c in enumerate((order // self.chunk).tolist()):
            if c not in seen:
                if len(seen) == self.mix:
                    cuts.append(i)
                    seen = set()
                seen.add(c)
        return np.split(order, cuts)

    def _read_cached(self, pos: np.ndarray) -> np.ndarray:
        """Cached prepared images of sorted positions within one chunk: one read of the span, picked."""
        block = self.cache.read(int(pos[0]), int(pos[-1]) + 1)
        return block if len(block) == len(pos) else block[pos - pos[0]]

    def _stream(self, order: np.ndarray, sizes: np.ndarray, los: np.ndarray, n_glob: np.ndarray
                ) -> Iterator[Batch]:
        """Read and prepare chunk segments in a background thread, one ahead of the consumer."""
        q: queue.Queue = queue.Queue(maxsize=1)  # in memory at most: served, queued, being prepared
        stop = threading.Event()
        pin = self.device.type == "cuda"

        def producer() -> None:
            try:
                for seg in self._segments(order):
                    srt = np.argsort(seg, kind="stable")
                    pos = seg[srt]
                    # one sequential read per chunk of the segment
                    parts = np.split(pos, np.flatnonzero(np.diff(pos // self.chunk)) + 1)
                    # the buffer that travels, filled in the segment's order: pinned and fp16 on the way
                    # to a GPU (as the stack held there would be: half the bytes)
                    shape = (len(pos), self.lattice.P, 2)
                    y = torch.empty(shape, dtype=self.dtype, pin_memory=True) if pin else \
                        _mapped_empty(shape, self.dtype)
                    dest = torch.from_numpy(srt)  # where the k-th sorted image goes in the segment
                    if self.cache is not None:  # prepared already, in the served dtype: read and place
                        at = 0
                        for p in parts:
                            y[dest[at:at + len(p)]] = torch.from_numpy(self._read_cached(p))
                            at += len(p)
                    else:
                        x = np.concatenate([read_chunk_rows(self.source, self.rows[p]) for p in parts])
                        for a in range(0, len(pos), PREP_BLOCK):
                            y[dest[a:a + PREP_BLOCK]] = self.prep(
                                x[a:a + PREP_BLOCK], self.shifts_px[pos[a:a + PREP_BLOCK]]).to(self.dtype)
                        del x
                    while not stop.is_set():
                        try:
                            q.put((seg, y), timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(None)
            except BaseException as e:  # hand the error to the consumer, which re-raises it
                q.put(e)

        th = threading.Thread(target=producer, daemon=True)
        th.start()
        # segments received and not yet served, in order; batches are slices of them (a batch straddling
        # two segments is the one copy), so no segment-sized buffer is ever copied or concatenated
        pend: list[tuple[np.ndarray, torch.Tensor]] = []
        n_pend = 0
        k = 0  # next batch to serve
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                if item is not None:
                    seg, y = item
                    # one large copy per segment (asynchronous from pinned memory on a GPU), not one per batch
                    pend.append((seg, y.to(self.device, non_blocking=pin)))
                    n_pend += len(seg)
                while k < len(sizes) and sizes[k] <= n_pend:
                    b = int(sizes[k])
                    pos, y = _take(pend, b, (0, self.lattice.P, 2), self.device)
                    n_pend -= b
                    yield self._make_batch(pos, y, int(los[k]), int(n_glob[k]))
                    k += 1
                if item is None:
                    break
        finally:
            stop.set()
            th.join(timeout=5)
