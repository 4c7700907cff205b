"""The search rounds of `drgn abinit`: reference → pose search over every image → next reference.

Each round reads the images in chunks (memory bounded by a chunk and the D³ grids, never by the data
set), and ends with a checkpoint `checkpoints/search_RRR.npz` (plain arrays, no pickle) holding every
particle's best and drawn poses, shifts, errors and confidences. A killed run resumes after its last
complete round: the next reference is rebuilt from the drawn poses, and each batch's random draw is
seeded by (seed, round, batch), so the rounds are those of an uninterrupted run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from drgn_core.abinit.search import PoseSearch, SearchConfig, SoftAccumulator, insert_slices, soft_batch
from drgn_core.backproject import (
    HALF_MAP_EPS,
    Reconstruction,
    fsc_shell_to_radius,
    reconstruct,
    shell_mean,
    snr_from_half_fsc,
    solve,
    split_halves,
    wiener_reg,
)
from drgn_core.io.atomic import atomic_path
from drgn_core.pose import random_poses
from drgn_core.progress import progress_bar

ROUND_KEYS = ("poses", "shifts", "error", "confidence", "drawn_poses", "drawn_shifts")


def round_path(run: Path, r: int) -> Path:
    return run / "checkpoints" / f"search_{r:03d}.npz"


def save_round(path: Path, result: dict[str, np.ndarray], L: int, resolution_A: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, L=np.array(L), resolution_A=np.array(resolution_A), **result)


def load_round(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def last_round(run: Path, n_rounds: int) -> int:
    """Number of consecutive complete rounds already checkpointed (0 when none)."""
    r = 0
    while r < n_rounds and round_path(run, r).exists():
        r += 1
    return r


def reference(read: Callable[[np.ndarray], np.ndarray], n: int, D: int, apix: float, poses: np.ndarray,
              shifts: np.ndarray, ctf: np.ndarray, halves: np.ndarray, progress: bool) -> Reconstruction:
    """The Wiener-filtered back-projection at the given poses (drgn_core.backproject.reconstruct)."""
    return reconstruct(read, n, D, apix, poses, shifts, ctf, halves, split="abinit", progress=progress)


def _minibatch(n: int, cfg: SearchConfig, seed: int, r: int) -> np.ndarray:
    """Sorted random rows for soft round r (-1: the initial reference): all when cfg.minibatch is 0."""
    if cfg.minibatch <= 0 or cfg.minibatch >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 0x5EED, r + 1]).choice(n, cfg.minibatch, replace=False))


def soft_reference(num1: np.ndarray, den1: np.ndarray, num2: np.ndarray, den2: np.ndarray, apix: float
                   ) -> tuple[np.ndarray, float]:
    """Full map (D³ float32) from two half sets' sums, Wiener-filtered by their FSC, as
    `backproject.reconstruct` does; returns (map, GSFSC(0.143) resolution in Å)."""
    from drgn_core.fourier import radius_3d
    from drgn_core.fsc import crossing, fsc_curve

    D = num1.shape[0]
    shell = np.minimum(np.floor(radius_3d(D)).astype(np.int64), D // 2 - 1)
    h1 = solve(num1, den1, HALF_MAP_EPS * shell_mean(den1)[shell])
    h2 = solve(num2, den2, HALF_MAP_EPS * shell_mean(den2)[shell])
    freq, fsc = fsc_curve(h1, h2)
    num, den = num1 + num2, den1 + den2
    lam = wiener_reg(den, snr_from_half_fsc(fsc_shell_to_radius(fsc)))
    return solve(num, den, lam), float(crossing(freq, fsc, 0.143, apix))


def search_rounds(read: Callable[[np.ndarray], np.ndarray], n: int, D: int, apix: float, ctf: np.ndarray,
                  cfg: SearchConfig, seed: int, run: Path, device: torch.device, progress: bool = True,
                  chunk: int = 1024, log: Callable[[str], None] = print) -> tuple[dict, Reconstruction]:
    """Run (or resume) every search round; returns the last round's result and the final reference
    (back-projected at the best poses of the last round).

    Rounds 0 … soft_iterations-1 are soft (the posterior over the whole base grid × shift grid is
    accumulated, `search.soft_batch`); the later ones are hard (top-K, local refinement, a drawn pose per
    image). Every round's checkpoint holds the reference of the next one (`reference`).
    """
    halves = split_halves(np.arange(n), None, seed)
    done = last_round(run, cfg.iterations)
    sums: list[np.ndarray] | None = None  # decayed soft sums (num₁, den₁, num₂, den₂) of recent minibatches
    if done == 0:
        rng = np.random.default_rng([seed, 0xAB1])
        pick = _minibatch(n, cfg, seed, -1)
        init = reference(lambda p: read(pick[p]), len(pick), D, apix, random_poses(len(pick), rng),
                         np.zeros((len(pick), 2)), ctf[pick], halves[pick], progress)
        vol = init.map
        result: dict[str, np.ndarray] = {}
    else:
        result = load_round(round_path(run, done - 1))
        vol = result["reference"]
        if "sums" in result:
            sums = [x if i % 2 == 0 else x.real.copy() for i, x in enumerate(result["sums"])]
        log(f"resuming the pose search after round {done}/{cfg.iterations}")
    for r in range(done, cfg.iterations):
        L = cfg.radius(r)
        soft = r < cfg.soft_iterations
        search = PoseSearch(vol, cfg, L, apix, device)
        acc = SoftAccumulator(search.S.shape[0], search.lat.P, device) if soft else None
        keys = ROUND_KEYS[:4] if soft else ROUND_KEYS
        sel = _minibatch(n, cfg, seed, r) if soft else np.arange(n)
        out: dict[str, list] = {k: [] for k in keys}
        bar = progress_bar(total=len(sel),
                           desc=f"search {r + 1}/{cfg.iterations} (L {L}{', soft' if soft else ''})",
                           unit="img", file=sys.stderr, disable=not progress, mininterval=1.0)
        b_id = 0
        for a in range(0, len(sel), chunk):
            pos = sel[a:a + chunk]
            images = read(pos)
            for b in range(0, len(pos), cfg.batch):
                p = pos[b:b + cfg.batch]
                if soft:
                    res = soft_batch(search, acc, images[b:b + cfg.batch], ctf[p], halves[p])
                else:
                    rng = np.random.default_rng([seed, r, b_id])
                    res = search.run_batch(images[b:b + cfg.batch], ctf[p], rng)
                for k in keys:
                    out[k].append(res[k])
                b_id += 1
                bar.update(len(p))
        bar.close()
        result = {k: np.concatenate(v) for k, v in out.items()}
        result["rows"] = sel
        if soft:
            new = insert_slices(acc, search.grid, search.lat, D)
            sums = list(new) if sums is None else [cfg.decay * a + b for a, b in zip(sums, new)]
            vol, res_A = soft_reference(*sums, apix)
            result["sums"] = np.stack(sums)
            result["drawn_poses"], result["drawn_shifts"] = result["poses"], result["shifts"]
        else:
            rec = reference(read, n, D, apix, result["drawn_poses"], result["drawn_shifts"], ctf, halves,
                            progress)
            vol, res_A = rec.map, _resolution(rec)
        result["reference"] = vol
        save_round(round_path(run, r), result, L, res_A)
        kind = "soft" if soft else "hard"
        log(f"search round {r + 1}/{cfg.iterations} ({kind}, L {L} px, {len(sel)} images): next reference "
            f"GSFSC(0.143) {res_A:.1f} Å, median confidence {np.median(result['confidence']):.1f}")
    final = reference(read, n, D, apix, result["poses"], result["shifts"], ctf, halves, progress)
    return result, final


def _resolution(rec: Reconstruction) -> float:
    from drgn_core.fsc import crossing

    return float(crossing(rec.freq, rec.fsc_masked, 0.143, rec.apix))
