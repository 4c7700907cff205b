"""Multi-class pose search (3D classification) between the two refinements of a heterogeneous `drgn abinit`.

Why. The search aligns every image to ONE consensus map. On heterogeneous data the images of states far
from the consensus get heavy-tailed pose errors: on the simulator's hinge (D 32, SNR 1) 12 % of the images
end more than 30° off, most of them at the ends of the motion, and the smallest compositional state is
not aligned at all (bench/abinit_het_diagnosis.py). A frame that drifts with the state is harmless (true
poses carrying each state's drift train a latent as good as the true poses), but those per-image errors
are not: the latent then sorts images by how they were misaligned. Each image needs a reference of its
own state.

What. The first refinement's latent is cut into K classes (k-means of z). Then, for `class_rounds` rounds
(hard expectation-maximisation, as RELION's and cryoSPARC's 3D classification):

1. each class's map is back-projected from its members at their drawn poses
   (`drgn_core.backproject.reconstruct`, Wiener-filtered by the class's own half-map FSC);
2. every image is searched globally against every class map at the final radius L_max (`PoseSearch`:
   base grid, top-K, local refinement, a drawn pose), and goes to the class whose best pose fits it best
   (the per-image amplitude is fitted, so errors of different maps compare). The class is chosen against
   each class's half map from the OTHER half set (Wiener-filtered by the half-set SNR): a map holding the
   image's own noise would keep the image in its class whatever its state (at D 64 and SNR 0.1, 0.4 %
   and then 0 % of the images changed class against full maps). The pose is then searched against the
   chosen class's full map, which has twice the images (K + 1 searches per image and round).

Each class keeps its own frame (classes are not aligned to each other: that drift does not hurt the
latent). The second refinement then trains a fresh model on the classified poses. Memory is bounded by a
chunk of images and 3K references (two half maps and the full map per class). Each round ends with a
checkpoint `checkpoints/classes_RRR.npz` (plain arrays);
each batch's draw is seeded by (seed, round, class, batch), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from drgn_core.abinit.search import PoseSearch, SearchConfig
from drgn_core.backproject import reconstruct
from drgn_core.io.atomic import atomic_path
from drgn_core.progress import progress_bar

CLASS_KEYS = ("labels", "poses", "shifts", "drawn_poses", "drawn_shifts", "error")


def class_round_path(run: Path, r: int) -> Path:
    return run / "checkpoints" / f"classes_{r:03d}.npz"


def _save(path: Path, state: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: state[k] for k in CLASS_KEYS})


def class_rounds(read: Callable[[np.ndarray], np.ndarray], n: int, D: int, apix: float, ctf: np.ndarray,
                 halves: np.ndarray, start: dict[str, np.ndarray], cfg: SearchConfig, seed: int, run: Path,
                 device: torch.device, progress: bool = True, chunk: int = 1024,
                 log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
    """Run (or resume) cfg.class_rounds rounds from `start` (labels (n,), poses (n, 3, 3), shifts (n, 2) px;
    the drawn poses default to them); returns the last round's state (CLASS_KEYS)."""
    state = {"drawn_poses": start["poses"], "drawn_shifts": start["shifts"], "error": np.zeros(n), **start}
    state["labels"] = np.asarray(state["labels"], dtype=np.int64)
    done = 0
    while done < cfg.class_rounds and class_round_path(run, done).exists():
        done += 1
    if done:
        with np.load(class_round_path(run, done - 1), allow_pickle=False) as z:
            state = {k: z[k] for k in CLASS_KEYS}
        log(f"resuming the class rounds after round {done}/{cfg.class_rounds}")
    for r in range(done, cfg.class_rounds):
        classes = [k for k in range(cfg.classes) if (state["labels"] == k).sum() >= 2]
        cross: list[list[PoseSearch]] = [[], []]   # [half of the image][class]: the other half's map
        full: list[PoseSearch] = []                   # [class]: the class's full map
        for k in classes:
            m = np.flatnonzero(state["labels"] == k)
            rec = reconstruct(lambda p, m=m: read(m[p]), len(m), D, apix, state["drawn_poses"][m],
                              state["drawn_shifts"][m], ctf[m], halves[m], progress=False, wiener_halves=True)
            for h in (0, 1):
                cross[h].append(PoseSearch(rec.halves_wiener[1 - h], cfg, cfg.L_max, apix, device))
            full.append(PoseSearch(rec.map, cfg, cfg.L_max, apix, device))
        out: dict[str, list] = {k: [] for k in ("rows", *CLASS_KEYS)}
        bar = progress_bar(total=n, desc=f"classes {r + 1}/{cfg.class_rounds} ({len(classes)} maps)",
                           unit="img", file=sys.stderr, disable=not progress, mininterval=1.0)
        b_id = 0
        for a in range(0, n, chunk):
            pos = np.arange(a, min(n, a + chunk))
            images = read(pos)
            for h in (0, 1):
                local = np.flatnonzero(halves[pos] == h)
                for b in range(0, len(local), cfg.batch):
                    j = local[b:b + cfg.batch]
                    err = [s.run_batch(images[j], ctf[pos[j]],
                                       np.random.default_rng([seed, 0xC1, r, k, b_id]))["error"]
                           for k, s in zip(classes, cross[h])]
                    best = np.stack(err).argmin(axis=0)
                    for c, k in enumerate(classes):
                        sel = j[best == c]
                        if len(sel) == 0:
                            continue
                        res = full[c].run_batch(images[sel], ctf[pos[sel]],
                                                np.random.default_rng([seed, 0xC2, r, k, b_id]))
                        out["rows"].append(pos[sel])
                        out["labels"].append(np.full(len(sel), k, dtype=np.int64))
                        for key in CLASS_KEYS[1:]:
                            out[key].append(res[key])
                    b_id += 1
                    bar.update(len(j))
        bar.close()
        order = np.argsort(np.concatenate(out.pop("rows")), kind="stable")
        new = {k: np.concatenate(v)[order] for k, v in out.items()}
        moved = float((new["labels"] != state["labels"]).mean())
        state = new
        _save(class_round_path(run, r), state)
        sizes = np.bincount(state["labels"], minlength=cfg.classes)
        log(f"class round {r + 1}/{cfg.class_rounds}: {100 * moved:.1f} % of the images changed class; "
            f"sizes {', '.join(str(int(s)) for s in sizes)}")
    return state
