"""`drgn abinit`: poses from scratch, then a cryoDRGN model trained with them, as a normal run directory.

    drgn abinit table.star particles.64.mrcs -o runs/abinit --zdim 0

Phases, each resumable (checkpoints/search_RRR.npz after every search round, checkpoints/refine.pt after
every refinement epoch; `--resume` continues a killed run and ends with the numbers of an uninterrupted
one):

1. pose search (`drgn_core.abinit.rounds`, `drgn_core.abinit.search`): soft then hard rounds of
   search and reconstruction at a growing Fourier radius;
2. refinement (`drgn_core.abinit.refine`): the model (homogeneous decoder, or encoder + decoder when
   zdim > 0) trained together with per-particle pose corrections by gradient descent;
3. with `--classes K` (zdim > 0): the latent cut into K classes, every image searched against every class
   map (`drgn_core.abinit.classes`, checkpoints/classes_RRR.npz), and a second refinement of a fresh model
   from the classified poses (checkpoints/refine_classes.pt).

The run directory is a `drgn train` run directory (docs/architecture.md § Run directory of drgn train):
config.yaml, model.pt, z.npy, z_logvar.npy, indices.npy, train_log.csv, learning_curve.png,
checkpoints/ — so `drgn volumes`, `analyze`, `traverse`, `explore`, `evaluate` read it unchanged — plus:

- `poses.star`: the canonical table with the found poses and shifts (RELION convention, Å) in the rows
  the run used; config.yaml's inputs.table points to it, so `drgn export` and `drgn explore` carry the
  found poses into STAR and `.cs` files;
- `confidence.npy` (+ `confidence.png`): per particle, rows as indices.npy, the Δχ² gap between the
  best pose and the best one more than 20° away (`drgn filter` can threshold it);
- `search/`: the last search round's back-projection (map.mrc, half maps, fsc.json, fsc.png, maps.png);
- `classes.npy` (with `--classes K`, zdim > 0): each particle's class after the multi-class search;
- `abinit.json`: the search's summary, and the note that the hand of the map is arbitrary.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from drgn_core import __version__
from drgn_core.abinit.refine import RefineConfig, refine
from drgn_core.abinit.rounds import search_rounds, starts_path
from drgn_core.abinit.search import SearchConfig
from drgn_core.data import ParticleData, estimate_norm_scale, open_particles, read_rows
from drgn_core.errors import DrgnError
from drgn_core.io.atomic import atomic_path
from drgn_core.io.indices import write_index_files
from drgn_core.io.table import POSE_COLUMNS, SHIFT_COLUMNS, ParticleTable, read_table, write_table
from drgn_core.models import HalfLattice, HetVAE, ModelConfig, model_payload
from drgn_core.pose import matrix_to_euler
from drgn_core.rundir import resolve_device
from drgn_core.train import (
    MODEL_OPTIONS,
    encode_latents,
    load_rows,
    log,
    plot_learning_curve,
    read_run_config,
    save_npy,
    sha256,
    write_config,
    write_log,
)

HAND_NOTE = ("the hand of a map found ab initio is arbitrary: its mirror image explains the images "
             "equally well (poses M·A·M, M = diag(1, 1, -1)); check it against a known feature (e.g. "
             "α-helix handedness) and flip with drgn volumes --flip / drgn export --flip-hand")
# options a resumed run may change: bookkeeping and resources only
RESUMABLE = {"device", "threads", "data_mode"}


def with_poses(table: ParticleTable, rows: np.ndarray, A: np.ndarray, shifts_A: np.ndarray
               ) -> ParticleTable:
    """A copy of the canonical table whose `rows` carry poses A (n, 3, 3) and shifts (n, 2) Å.

    Stack paths are made absolute, so the copy can live in the run directory."""
    particles = table.particles.copy()
    particles["drgnStackPath"] = [str(p) for p in table.stack_paths()]
    # a table imported with --no-poses reads its placeholder zeros back as integer columns
    cols = [*POSE_COLUMNS, *SHIFT_COLUMNS]
    particles[cols] = particles[cols].astype(np.float64)
    particles.loc[rows, POSE_COLUMNS] = matrix_to_euler(A)
    particles.loc[rows, SHIFT_COLUMNS] = shifts_A
    return ParticleTable(particles, table.optics.copy(), table.path, dict(table.provenance))


def plot_confidence(path: Path, conf: np.ndarray) -> None:
    """Histogram of the per-particle confidence, so a threshold can be picked by eye."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    c = np.asarray(conf, dtype=np.float64)
    ax.hist(np.clip(c, 0, np.percentile(c, 99.5)), bins=60, color="0.3")
    ax.set_xlabel("pose confidence Δχ² (best vs best pose > 20° away)")
    ax.set_ylabel("particles")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _drop_orphan_checkpoints(run: Path) -> None:
    """A fresh run must not pick up search or refinement checkpoints left in `run` by an earlier run whose
    config.yaml is gone (a workflow rerun after its outputs were deleted): without that config they cannot
    be resumed, and reading them would mix two runs. They are drgn abinit's own files, so they are removed."""
    ck = run / "checkpoints"
    stale = ([p for pat in ("search_*.npz", "classes_*.npz", "refine.pt", "refine_classes.pt")
              for p in sorted(ck.glob(pat))] if ck.is_dir() else [])
    if stale:
        log(f"{run}: removing {len(stale)} checkpoint(s) of an earlier run without config.yaml")
        for p in stale:
            p.unlink()


def abinit(table_path: str | os.PathLike, stack_path: str | os.PathLike, outdir: str | os.PathLike,
           model_opts: dict | None = None, search_opts: dict | None = None, refine_opts: dict | None = None,
           seed: int = 0, device: str = "auto", threads: int = 0, data_mode: str = "auto",
           ind_path: str | os.PathLike | None = None, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) ab initio reconstruction into `outdir`; returns its path."""
    run = Path(outdir)
    model_opts, search_opts = dict(model_opts or {}), dict(search_opts or {})
    refine_opts = dict(refine_opts or {})
    table = read_table(table_path)
    source = open_particles(stack_path, table)
    rows = load_rows(ind_path, len(table))
    n, D, apix = len(rows), source.D, source.apix
    if n < 2:
        raise DrgnError(f"ab initio needs at least 2 particles, got {n}")
    given = {"seed": seed, **model_opts, **search_opts, **refine_opts}
    if resume:
        stored = read_run_config(run)
        ab = stored.get("abinit") or {}
        was = {"seed": ab.get("seed"), **stored["model"], **ab.get("search", {}), **ab.get("refine", {})}
        bad = [f"{k} = {v!r} (the run has {was.get(k)!r})" for k, v in given.items()
               if k in was and was[k] != v and k not in RESUMABLE]
        if bad:
            raise DrgnError(f"{run}: cannot resume with different settings: " + "; ".join(bad))
        for key, p in (("table", table_path), ("stack", stack_path)):
            if stored["inputs"][f"source_{key}_sha256" if key == "table" else "stack_sha256"] != sha256(p):
                raise DrgnError(f"{p}: the run started with other {key} content; a resumed run must use the "
                                "same data")
        scfg = SearchConfig.from_dict({"starts": 1, **ab["search"]})  # runs from before --starts had one
        rcfg = RefineConfig.from_dict(ab["refine"])
        mcfg0 = stored["model"]
        seed = int(ab["seed"])
        run_config = stored
    else:
        if (run / "config.yaml").exists():
            raise DrgnError(f"{run}: already holds a run; pass --resume to continue it, or choose another "
                            "output directory")
        _drop_orphan_checkpoints(run)
        scfg = SearchConfig.from_dict(search_opts).resolved(D)
        rcfg = RefineConfig.from_dict(refine_opts)
        mcfg0 = None
        run_config = None
    if threads > 0:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    sub = table.subset(rows)
    ctf = sub.ctf_params(apix)
    lattice = HalfLattice(D)

    if run_config is None:
        opts = {"zdim": 0, **{k: model_opts[k] for k in MODEL_OPTIONS if k in model_opts}}
        if opts["zdim"] < 0:
            raise DrgnError("--zdim must be >= 0")
        if scfg.classes > 1 and opts["zdim"] == 0:
            raise DrgnError(f"--classes {scfg.classes} needs a heterogeneous run (--zdim > 0): the classes "
                            "are cut from the latent")
        scale = estimate_norm_scale(source, rows, np.zeros((n, 2)), lattice, seed)
        mcfg = ModelConfig(D=D, norm_scale=scale, apix=apix, **opts)
        run.mkdir(parents=True, exist_ok=True)
        run_config = _abinit_config(mcfg, scfg, rcfg, seed, table_path, stack_path, ind_path, run, n, D, apix,
                                 dev)
        write_config(run / "config.yaml", run_config)
    else:
        mcfg = ModelConfig.from_dict(mcfg0)

    # ---- phase 1: pose search
    def read(pos: np.ndarray) -> np.ndarray:
        return read_rows(source, rows[pos])

    result, final = search_rounds(read, n, D, apix, ctf, scfg, seed, run, dev, progress=progress, log=log)
    from drgn_core.backproject import write_reconstruction
    from drgn_core.plots import volume_sheet

    write_reconstruction(final, run / "search", extra={"note": HAND_NOTE})
    volume_sheet(final.map[None], run / "search" / "maps.png", ["search map (hand arbitrary)"])

    # ---- phase 2: refinement of poses and model by gradient descent
    searched = with_poses(table, rows, result["poses"], result["shifts"] * apix)
    data = ParticleData(source, searched, rows, lattice, mcfg.norm_scale, dev, data_mode, 0, progress, mix=4)
    torch.manual_seed(seed)
    model = HetVAE(mcfg, generator=torch.Generator().manual_seed(seed)).to(dev)
    A, dt, log_rows = refine(model, data, rcfg, seed, run / "checkpoints" / "refine.pt", progress, log)
    shifts, labels = result["shifts"] + dt, None

    # ---- heterogeneous runs, --classes K: classes of the latent, a multi-class search, a second refinement
    if mcfg.zdim > 0 and scfg.classes > 1:
        from drgn_core.abinit.classes import class_rounds
        from drgn_core.analysis import kmeans
        from drgn_core.backproject import split_halves

        mu, _ = encode_latents(model, data, progress=progress)
        start = {"labels": kmeans(mu, min(scfg.classes, n), seed)[0], "poses": A, "shifts": shifts}
        cls = class_rounds(read, n, D, apix, ctf, split_halves(np.arange(n), None, seed), start, scfg, seed,
                           run, dev, progress=progress, log=log)
        classified = with_poses(table, rows, cls["poses"], cls["shifts"] * apix)
        data = ParticleData(source, classified, rows, lattice, mcfg.norm_scale, dev, data_mode, 0, progress,
                            mix=4)
        torch.manual_seed(seed)
        model = HetVAE(mcfg, generator=torch.Generator().manual_seed(seed)).to(dev)
        A, dt, log_rows = refine(model, data, rcfg, seed, run / "checkpoints" / "refine_classes.pt", progress,
                                 log)
        shifts, labels = cls["shifts"] + dt, cls["labels"]
    found = with_poses(table, rows, A, shifts * apix)

    # ---- outputs; model.pt last, so that its presence means a finished run
    write_table(found, run / "poses.star", abinit_run=str(run.resolve()), hand="arbitrary")
    save_npy(run / "confidence.npy", result["confidence"].astype(np.float32))
    if labels is not None:
        save_npy(run / "classes.npy", labels.astype(np.int64))
    plot_confidence(run / "confidence.png", result["confidence"])
    mu, logvar = encode_latents(model, data, progress=progress)
    save_npy(run / "z.npy", mu)
    save_npy(run / "z_logvar.npy", logvar)
    write_index_files(rows, run / "indices.npy")
    write_index_files(rows[:0], run / "val_indices.npy")
    write_log(run / "train_log.csv", log_rows)
    plot_learning_curve(run / "learning_curve.png", log_rows)
    summary = {"n_particles": n, "D": D, "apix": apix, "search": scfg.to_dict(), "refine": rcfg.to_dict(),
               "median_confidence": float(np.median(result["confidence"])),
               "search_map_gsfsc_0.143_A": _gsfsc(final), "hand": HAND_NOTE}
    if scfg.starts > 1 and starts_path(run).exists():  # which start the search continued, and why
        summary["starts"] = json.loads(starts_path(run).read_text())
    if labels is not None:
        summary["class_sizes"] = [int(c) for c in np.bincount(labels, minlength=scfg.classes)]
    with atomic_path(run / "abinit.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    with atomic_path(run / "model.pt") as tmp:
        torch.save(model_payload(model, mcfg, epochs=rcfg.epochs, precision="fp32"), tmp)
    log(f"{run}: done. Note: {HAND_NOTE}")
    return run


def _gsfsc(rec) -> float:
    from drgn_core.fsc import crossing

    return float(crossing(rec.freq, rec.fsc_masked, 0.143, rec.apix))


def _abinit_config(mcfg: ModelConfig, scfg: SearchConfig, rcfg: RefineConfig, seed: int, table_path,
                   stack_path, ind_path, run: Path, n: int, D: int, apix: float, dev: torch.device) -> dict:
    """config.yaml: as drgn train's (model, training, inputs, versions) plus the ab initio settings.

    inputs.table is the run's own poses.star (the found poses), which later stages read; the user's
    table is inputs.source_table."""
    return {
        "model": mcfg.to_dict(),
        "training": {"epochs": rcfg.epochs, "batch_size": rcfg.batch_size, "lr": rcfg.lr, "beta": rcfg.beta,
                     "seed": seed, "device": str(dev), "precision": "fp32", "val_frac": 0.0},
        "abinit": {"seed": seed, "search": scfg.to_dict(), "refine": rcfg.to_dict(), "hand": HAND_NOTE},
        "inputs": {"table": str((run / "poses.star").resolve()), "stack": str(Path(stack_path).resolve()),
                   "source_table": str(Path(table_path).resolve()),
                   "ind": str(Path(ind_path).resolve()) if ind_path else None,
                   "source_table_sha256": sha256(table_path), "stack_sha256": sha256(stack_path),
                   "ind_sha256": sha256(ind_path) if ind_path else None,
                   "n_particles": n, "n_train": n, "n_val": 0, "D": D, "apix": apix},
        "versions": {"drgnflow": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
                     "python": platform.python_version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


