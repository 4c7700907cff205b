"""The search rounds of `drgn abinit`: reference → pose search over every image → next reference.

Each round reads the images in chunks (memory bounded by a chunk and the D³ grids, never by the data
set), and ends with a checkpoint `checkpoints/search_RRR.npz` (plain arrays, no pickle) holding every
particle's best and drawn poses, shifts, errors and confidences. A killed run resumes after its last
complete round: the next reference is rebuilt from the drawn poses, and each batch's random draw is
seeded by (seed, round, batch), so the rounds are those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
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


def round_path(run: Path, r: int, start: int | None = None) -> Path:
    """Round r's checkpoint: of the run's search, or of one of several starts' soft rounds."""
    folder = run / "checkpoints" if start is None else run / "checkpoints" / f"start_{start}"
    return folder / f"search_{r:03d}.npz"


def save_round(path: Path, result: dict[str, np.ndarray], L: int, resolution_A: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, L=np.array(L), resolution_A=np.array(resolution_A), **result)


def load_round(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def last_round(run: Path, n_rounds: int, start: int | None = None) -> int:
    """Number of consecutive complete rounds already checkpointed (0 when none)."""
    r = 0
    while r < n_rounds and round_path(run, r, start).exists():
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
    image). Every round's checkpoint holds the reference of the next one (`reference`). With
    cfg.starts > 1 the soft rounds run from several random starts and the hard rounds continue the one
    whose map aligns a common probe of images most confidently (`choose_start`).
    """
    halves = split_halves(np.arange(n), None, seed)
    chose = cfg.starts > 1 and 0 < cfg.soft_iterations < cfg.iterations and \
        last_round(run, cfg.iterations) < cfg.soft_iterations
    if chose:
        choose_start(read, n, D, apix, ctf, cfg, seed, halves, run, device, progress, chunk, log)
    done, result, vol, sums = _where(read, n, D, apix, ctf, cfg, seed, halves, run, None, cfg.iterations,
                                     progress)
    if done and not chose:
        log(f"resuming the pose search after round {done}/{cfg.iterations}")
    result = _rounds(read, n, D, apix, ctf, cfg, seed, halves, run, None, range(done, cfg.iterations), vol,
                     sums, result, device, progress, chunk, log)
    final = reference(read, n, D, apix, result["poses"], result["shifts"], ctf, halves, progress)
    return result, final


def start_seed(seed: int, start: int) -> int:
    """The random stream of start `start`: start 0 is the run's own seed (one start = the plain search)."""
    return seed if start == 0 else int(np.random.default_rng([seed, 0x57A27, start]).integers(2**31))


def initial_reference(read: Callable[[np.ndarray], np.ndarray], n: int, D: int, apix: float, ctf: np.ndarray,
                      cfg: SearchConfig, seed: int, halves: np.ndarray, progress: bool) -> np.ndarray:
    """The first reference: a minibatch back-projected at random poses."""
    rng = np.random.default_rng([seed, 0xAB1])
    pick = _minibatch(n, cfg, seed, -1)
    return reference(lambda p: read(pick[p]), len(pick), D, apix, random_poses(len(pick), rng),
                     np.zeros((len(pick), 2)), ctf[pick], halves[pick], progress).map


def _where(read: Callable[[np.ndarray], np.ndarray], n: int, D: int, apix: float, ctf: np.ndarray,
           cfg: SearchConfig, seed: int, halves: np.ndarray, run: Path, start: int | None, n_rounds: int,
           progress: bool) -> tuple[int, dict, np.ndarray, list | None]:
    """Where a search (or one start's soft rounds) stands: (rounds done of `n_rounds`, the last round's
    result, the next reference, the decayed soft sums or None), from its last checkpoint or from scratch."""
    done = last_round(run, n_rounds, start)
    if done == 0:
        return 0, {}, initial_reference(read, n, D, apix, ctf, cfg, seed, halves, progress), None
    result = load_round(round_path(run, done - 1, start))
    sums = None
    if "sums" in result:
        sums = [x if i % 2 == 0 else x.real.copy() for i, x in enumerate(result["sums"])]
    return done, result, result["reference"], sums


def _rounds(read: Callable[[np.ndarray], np.ndarray], n: int, D: int, apix: float, ctf: np.ndarray,
            cfg: SearchConfig, seed: int, halves: np.ndarray, run: Path, start: int | None, rounds: range,
            vol: np.ndarray, sums: list | None, result: dict, device: torch.device, progress: bool,
            chunk: int, log: Callable[[str], None]) -> dict:
    """Run `rounds` from reference `vol`, checkpointing each; returns the last round's result."""
    tag = "" if start is None else f"start {start + 1}/{cfg.starts}, "
    for r in rounds:
        L = cfg.radius(r)
        soft = r < cfg.soft_iterations
        search = PoseSearch(vol, cfg, L, apix, device)
        acc = SoftAccumulator(search.S.shape[0], search.lat.P, device) if soft else None
        keys = ROUND_KEYS[:4] if soft else ROUND_KEYS
        sel = _minibatch(n, cfg, seed, r) if soft else np.arange(n)
        out: dict[str, list] = {k: [] for k in keys}
        bar = progress_bar(total=len(sel),
                           desc=f"{tag}search {r + 1}/{cfg.iterations} (L {L}{', soft' if soft else ''})",
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
        save_round(round_path(run, r, start), result, L, res_A)
        kind = "soft" if soft else "hard"
        log(f"{tag}search round {r + 1}/{cfg.iterations} ({kind}, L {L} px, {len(sel)} images): next "
            f"reference GSFSC(0.143) {res_A:.1f} Å, median confidence {np.median(result['confidence']):.1f}")
    return result


def starts_path(run: Path) -> Path:
    return run / "checkpoints" / "starts.json"


def choose_start(read: Callable[[np.ndarray], np.ndarray], n: int, D: int, apix: float, ctf: np.ndarray,
                 cfg: SearchConfig, seed: int, halves: np.ndarray, run: Path, device: torch.device,
                 progress: bool, chunk: int, log: Callable[[str], None]) -> dict:
    """Soft rounds from cfg.starts random starts; the start whose last reference aligns a common probe of
    cfg.probe images with the highest median confidence becomes the run's soft rounds.

    Why: at low SNR the soft rounds settle on a wrong map for some random streams (bench/README.md,
    *Several starts*), and a wrong map aligns images less decisively: the probe's median confidence (the
    Δχ² gap between the best pose and the best one > confidence_angle away) separates the two. Each
    start checkpoints its rounds (checkpoints/start_S/), the scores and the choice go to
    checkpoints/starts.json, and the chosen start's checkpoints are linked in as the run's own soft rounds,
    so a kill at any point resumes to the same choice. Of the other starts only the last round (its map)
    is kept. Returns the starts.json record.
    """
    record_path = starts_path(run)
    if record_path.exists():
        record = json.loads(record_path.read_text())
    else:
        scores = []
        probe = _probe_rows(n, cfg, seed)
        L = cfg.radius(cfg.soft_iterations)  # the first hard round's radius
        images = read(probe)
        for s in range(cfg.starts):
            s_seed = start_seed(seed, s)
            done, result, vol, sums = _where(read, n, D, apix, ctf, cfg, s_seed, halves, run, s,
                                             cfg.soft_iterations, progress)
            if done < cfg.soft_iterations:
                result = _rounds(read, n, D, apix, ctf, cfg, s_seed, halves, run, s,
                                 range(done, cfg.soft_iterations), vol, sums, result, device, progress, chunk,
                                 log)
                vol = result["reference"]
            search = PoseSearch(vol, cfg, L, apix, device)
            conf, err = [], []
            bar = progress_bar(total=len(probe), desc=f"start {s + 1}/{cfg.starts}, probe (L {L})",
                               unit="img", file=sys.stderr, disable=not progress, mininterval=1.0)
            for b in range(0, len(probe), cfg.batch):
                res = search.run_batch(images[b:b + cfg.batch], ctf[probe[b:b + cfg.batch]],
                                       np.random.default_rng([seed, 0x9A0BE, s, b]))
                conf.append(res["confidence"])
                err.append(res["error"])
                bar.update(len(res["confidence"]))
            bar.close()
            conf_all, err_all = np.concatenate(conf), np.concatenate(err)
            scores.append({"start": s, "seed": s_seed, "median_confidence": float(np.median(conf_all)),
                           "mean_error": float(np.mean(err_all))})
            log(f"start {s + 1}/{cfg.starts}: median confidence {scores[-1]['median_confidence']:.1f} on "
                f"{len(probe)} probe images")
        chosen = int(np.argmax([sc["median_confidence"] for sc in scores]))
        record = {"chosen": chosen, "probe": len(probe), "L": int(L), "starts": scores}
        with atomic_path(record_path) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
    chosen = int(record["chosen"])
    for r in range(cfg.soft_iterations):  # the chosen start's rounds become the run's (links: no copies)
        dst = round_path(run, r)
        if not dst.exists():
            _link_or_copy(round_path(run, r, chosen), dst)
    last = cfg.soft_iterations - 1
    for s in range(cfg.starts):  # keep only the other starts' last rounds (their maps), for inspection
        for r in range(cfg.soft_iterations):
            if s == chosen or r < last:
                round_path(run, r, s).unlink(missing_ok=True)
    shutil.rmtree(round_path(run, 0, chosen).parent, ignore_errors=True)
    log(f"pose search: start {chosen + 1} of {cfg.starts} chosen (probe median confidence "
        + ", ".join(f"{sc['median_confidence']:.1f}" for sc in record["starts"]) + ")")
    return record


def _probe_rows(n: int, cfg: SearchConfig, seed: int) -> np.ndarray:
    """The common images every start is scored on (sorted, seeded; all when there are fewer)."""
    if cfg.probe <= 0 or cfg.probe >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 0x9A0BE]).choice(n, cfg.probe, replace=False))


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes src's content atomically: a hard link where the file system allows, else a copy."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _resolution(rec: Reconstruction) -> float:
    from drgn_core.fsc import crossing

    return float(crossing(rec.freq, rec.fsc_masked, 0.143, rec.apix))
