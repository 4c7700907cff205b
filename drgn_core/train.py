"""Training a cryoDRGN model on one dataset: one readable loop, resumable bit for bit on the CPU.

    drgn train table.star particles.64.mrcs -o run --zdim 10 --epochs 20

reads top to bottom as: options → inputs (table, stack, rows, validation split) → device and precision →
normalisation → model, optimizer, random generator → resume → the loop (train batches, checkpoints,
validation, log line) → final outputs (latents for every row, model.pt, log, plot).

Reproducibility. Each epoch's order is a function of (seed, epoch) (`ParticleData.epoch_order`); the only
other randomness, the VAE's reparameterisation noise, comes from one torch.Generator whose state goes into
every checkpoint with the weights, Adam's moments, the position within the epoch and the epoch's running
sums. A run killed at any moment and resumed from its last checkpoint therefore ends, on the CPU with the
same thread count, with exactly the weights of an uninterrupted run.

Several processes (torchrun; `drgn train --nproc N`): every rank runs this same loop on the same epoch
order and takes its slice of each global batch; gradients are summed over ranks (drgn_core.distributed),
so the weights follow one process's to rounding, whatever the number of processes, and a checkpoint
written by rank 0 resumes on any number of them. Validation sums and latents are gathered in row order.

Run directory (docs/architecture.md): config.yaml, checkpoints/last.pt, then at the end model.pt, z.npy,
z_logvar.npy, indices.npy and val_indices.npy (each + .txt), train_log.csv, learning_curve.png. model.pt is
written last but one, so its presence marks a finished run. --encode-every N and --epochs auto also keep
epoch snapshots (checkpoints/z.EEE.npy, model.EEE.pt; docs/architecture.md § Convergence); config.yaml's
`stopped` says after which epoch and why training ended.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from drgn_core import __version__
from drgn_core.curriculum import curriculum_epochs, resolve_curriculum
from drgn_core.data import ParticleData, estimate_norm_scale, open_particles
from drgn_core.distributed import Dist, from_env, rank_device, sum_gradients_
from drgn_core.errors import DrgnError, InputError
from drgn_core.io.atomic import atomic_path
from drgn_core.io.indices import read_index_file, write_index_files
from drgn_core.io.table import read_table
from drgn_core.models import (
    HalfLattice,
    HetVAE,
    ModelConfig,
    image_mse,
    model_payload,
    vae_loss,
)
from drgn_core.pixel_select import DecoderPixels, decoder_pixels, snr_by_radius
from drgn_core.progress import progress_bar
from drgn_core.rundir import resolve_device
from drgn_core.schedule import LrSchedule, schedule_for, set_lr
from drgn_core.train_subset import choose_train_subset

CHECKPOINT_FORMAT = "drgnflow-checkpoint/1"
# Options a resumed run may change: speed and bookkeeping, the length of training (a fixed --epochs N also
# continues a run that --epochs auto stopped), and the learning rate
# (lowering it refines a run whose loss levelled off; train_log.csv records it per epoch). --auto-resume
# treats another learning rate as another run.
RESUMABLE = {"epochs", "auto_stop", "lr", "device", "threads", "checkpoint_every", "checkpoint_minutes",
             "data_mode", "chunk", "mix_chunks", "encode_every", "log_steps", "stream_cache"}
MODEL_OPTIONS = ("zdim", "enc_dim", "enc_layers", "dec_dim", "dec_layers", "pe_type", "pe_dim", "feat_sigma",
                 "enc_mask")


@dataclass
class TrainConfig:
    """Training hyperparameters and run settings (paper defaults: Adam, lr 1e-4, batch 8)."""

    epochs: int = 20                  # with auto_stop: the most epochs (the user's maximum)
    auto_stop: bool = False           # --epochs auto: stop once the epochs' outputs settle (convergence.py)
    batch_size: int = 8
    lr: float = 1e-4
    beta: float | None = None         # KL weight; None → 1/zdim
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    precision: str = "auto"           # auto (bf16 where GPU/CPU do it natively, else fp32) | fp32 | bf16
    threads: int = 0                  # torch CPU threads; 0 = torch's default
    val_frac: float = 0.1             # held-out fraction, validation loss reported per epoch
    checkpoint_every: int = 1         # epochs between checkpoints
    checkpoint_minutes: float = 30.0  # also checkpoint mid-epoch after this long (0: never)
    data_mode: str = "auto"           # auto | memory | stream
    chunk: int = 0                    # images per streamed chunk (one sequential read); 0: 8 MiB prepared
    mix_chunks: int = 4               # streamed chunks whose images are shuffled together
    stream_cache: str = "run"         # streamed: prepared images cached in RUN/stream_cache | off | a folder
    encode_every: int = 0             # also write checkpoints/z.EEE.npy every N epochs (0: only at the end)
    log_steps: bool = False           # also write train_steps.csv: the global batch's losses at every step
    curriculum: str = ""              # --curriculum R:E,...: Fourier radius per phase (drgn_core.curriculum)
    pixel_keep: float = 1.0           # --pixel-keep F: decoder at each image's top-F pixels by CTF²
    pixel_by: str = "ctf2"            # --pixel-by: rank pixels by ctf2 | snr (CTF² × spectral SNR)
    # learning-rate schedule and batch scaling (drgn_core/schedule.py; defaults: the paper's constant rate)
    lr_schedule: str = "constant"     # constant | cosine | step
    warmup_epochs: float = 0.0        # linear warm-up over this many epochs' steps
    lr_final: float = 0.1             # cosine/step: the final rate, as a fraction of the peak
    lr_drops: int = 2                 # step: number of equal geometric drops
    lr_decay_epochs: int | None = None  # the decay's horizon; None → the run's epochs when it starts
    lr_scale: str = "none"            # none | sqrt | linear: scale lr by (batch_size / lr_ref_batch)^p
    lr_ref_batch: int = 8             # the batch that --lr suits (the paper's)
    train_subset: float = 0           # train on a seeded subset of the training rows: N (>= 1) or a fraction

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---- small helpers ------------------------------------------------------------------------------------
def sha256(path: str | os.PathLike) -> str:
    """Checksum of an input file; a stack may be many GB, so one file is read once per process."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is read again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX), where bf16 autocast pays off;
    elsewhere torch emulates bf16 on the CPU and it would only be slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32.

    'auto' is bf16 on GPUs that support it and on CPUs with native bf16 arithmetic. On the CPU this was
    decided by measurement (docs in bench/train_accuracy.py and bench/train_throughput.py): the latent
    ordering, losses and map resolution matched fp32 while training ran 2.2-3.6 times faster.
    """
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def load_rows(ind_path: str | os.PathLike | None, n_table: int, allow_pickle: bool = False) -> np.ndarray:
    """Sorted canonical table rows to train on: all rows, or those listed in an index file (no repeats)."""
    if ind_path is None:
        return np.arange(n_table, dtype=np.int64)
    return np.sort(read_index_file(ind_path, n_table, allow_pickle=allow_pickle))


def stream_cache_dir(run: Path, setting: str) -> Path | None:
    """Where streamed training caches its prepared images: 'run' → RUN/stream_cache (removed when the
    run finishes, kept for a resume until then), 'off' → nowhere, else that folder (kept: runs on the
    same data and seed share it)."""
    if setting == "off":
        return None
    return run / "stream_cache" if setting == "run" else Path(setting)


def split_validation(n: int, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, validation positions), both sorted, from a permutation seeded by `seed`."""
    if not 0.0 <= val_frac < 1.0:
        raise DrgnError(f"--val-frac must be in [0, 1), got {val_frac}")
    perm = np.random.default_rng([seed, 0x7A1]).permutation(n)
    n_val = round(val_frac * n)
    if n - n_val < 1:
        raise DrgnError(f"only {n} particles: nothing left to train on after the validation split")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _refuse_conflicts(stored: dict, given: dict, run: Path, resumable: frozenset | set = RESUMABLE) -> None:
    bad = [f"{k} = {given[k]!r} (the run has {stored.get(k)!r})" for k in given
           if k not in resumable and k in stored and given[k] != stored[k]]
    if bad:
        raise DrgnError(f"{run}: cannot resume with different settings: " + "; ".join(bad))


# ---- one batch ----------------------------------------------------------------------------------------
def batch_loss(model: HetVAE, batch, beta: float, amp: torch.dtype | None, gen: torch.Generator | None,
               pixels: DecoderPixels | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean MSE, mean KL) of one batch; samples z from q(z | image) when `gen` is given, else z = μ.

    `pixels` (drgn_core.pixel_select) restricts the decoder to a Fourier radius and/or each image's top
    pixels by CTF²; None is every pixel."""
    dev = batch.y.device
    with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        mu = logvar = z = None
        if model.zdim > 0:
            y_enc = batch.y if pixels is None else pixels.encoder_input(batch.y)
            mu, logvar = model.encode(y_enc, batch.ctf)                        # (B, zdim) each
            z = mu
            if gen is not None:
                # one draw per image of the *global* batch, this rank keeping its rows: the same noise for
                # an image whatever the number of processes
                n_glob = batch.n_global if batch.n_global > 0 else mu.shape[0]
                eps = torch.randn((n_glob, mu.shape[1]), generator=gen, device=dev)
                eps = eps[batch.lo:batch.lo + mu.shape[0]] if batch.n_global > 0 else eps
                z = mu + eps * torch.exp(0.5 * logvar)
        if pixels is None:
            pred, y, w = model.slice(batch.A, z) * batch.ctf[..., None], batch.y, model.weights  # (B, P, 2)
        else:
            pred, y, w = pixels.predict(model, batch, z)
    n_full = model.lattice.n_full if pixels is None else pixels.n_full
    mse = image_mse(pred, y, w, n_full)                                       # (B,)
    loss, kl = vae_loss(mse, mu, logvar, beta, n_full)
    return loss, mse.mean(), kl


@torch.no_grad()
def evaluate(model: HetVAE, data: ParticleData, positions: np.ndarray, beta: float, amp: torch.dtype | None,
             batch_size: int = 64, dist: Dist | None = None, pixels: DecoderPixels | None = None
             ) -> dict[str, float]:
    """Mean loss, MSE and KL over `positions` at z = μ (deterministic, uses no random numbers).

    With several processes each evaluates its share of `positions` and the sums are added up: every rank
    returns the same numbers.
    """
    if not len(positions):
        return {"loss": math.nan, "mse": math.nan, "kl": math.nan}
    dist = dist or Dist()
    was = model.training
    model.eval()
    sums = np.zeros(3)
    for b in data.batches(dist.shard(positions), batch_size):
        loss, mse, kl = batch_loss(model, b, beta, amp, None, pixels)
        sums += len(b.pos) * np.array([loss.item(), mse.item(), kl.item()])
    if dist.active:
        sums = dist.all_reduce_(torch.from_numpy(sums).to(data.device)).cpu().numpy()
    model.train(was)
    return {k: float(v) for k, v in zip(("loss", "mse", "kl"), sums / len(positions))}


@torch.no_grad()
def encode_latents(model: HetVAE, data: ParticleData, amp: torch.dtype | None = None, batch_size: int = 256,
                   progress: bool = True, dist: Dist | None = None, pixels: DecoderPixels | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means and log-variances (N, zdim) float32 for every row of `data`, in row order.

    With several processes each encodes a contiguous share of the rows and the results are summed into
    zero-filled arrays (exact: every entry has one non-zero term), so every rank holds all rows in
    canonical order. `pixels`: a snapshot taken inside a curriculum phase encodes what that phase's
    encoder sees (the pixels inside its radius; drgn_core.pixel_select).
    """
    dist = dist or Dist()
    n, zdim = data.n, model.zdim
    mu_all = np.zeros((n, zdim), dtype=np.float32)
    lv_all = np.zeros((n, zdim), dtype=np.float32)
    if zdim == 0:
        return mu_all, lv_all
    was = model.training
    model.eval()
    mine = dist.shard(np.arange(n))
    bar = progress_bar(total=len(mine), desc="encoding", unit="img", disable=not progress, mininterval=1.0,
               file=sys.stderr)
    for b in data.batches(mine, batch_size):
        with torch.autocast(b.y.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            mu, lv = model.encode(b.y if pixels is None else pixels.encoder_input(b.y), b.ctf)
        idx = b.pos.numpy()
        mu_all[idx], lv_all[idx] = mu.float().cpu().numpy(), lv.float().cpu().numpy()
        bar.update(len(idx))
    bar.close()
    if dist.active:
        both = dist.all_reduce_(torch.from_numpy(np.stack([mu_all, lv_all])).to(data.device)).cpu().numpy()
        mu_all, lv_all = both[0], both[1]
    model.train(was)
    return mu_all, lv_all


# ---- outputs ------------------------------------------------------------------------------------------
def save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)


def save_snapshot(run: Path, model: HetVAE, mcfg: ModelConfig, epoch: int, mu: np.ndarray,
                  amp: torch.dtype | None) -> None:
    """One epoch's snapshot for `drgn convergence`: the latent means (checkpoints/z.EEE.npy) and the
    weights (checkpoints/model.EEE.pt, a model.pt of that epoch), so that the maps of two epochs can be
    decoded at the same particles' latents and compared."""
    save_npy(run / "checkpoints" / f"z.{epoch:03d}.npy", mu)
    with atomic_path(run / "checkpoints" / f"model.{epoch:03d}.pt") as tmp:
        torch.save(model_payload(model, mcfg, epochs=epoch, precision="bf16" if amp else "fp32"), tmp)


LOG_COLUMNS = ("epoch", "loss", "mse", "kl", "val_loss", "val_mse", "val_kl", "images_per_s", "seconds",
               "peak_mem_MiB", "lr", "radius", "decoder_points", "latent_change", "neighbours_kept",
               "map_agreement")


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on a GPU; peak resident memory of this process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_log(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(",".join(LOG_COLUMNS) + "\n")
            for r in rows:
                cells = [f"{r[c]:d}" if c == "epoch" else f"{r.get(c, math.nan):.6g}" for c in LOG_COLUMNS]
                f.write(",".join(cells) + "\n")


def plot_learning_curve(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(ep, [r["loss"] for r in rows], "o-", label="training loss")
    if rows and not math.isnan(rows[0]["val_loss"]):
        ax.plot(ep, [r["val_loss"] for r in rows], "s-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (MSE + β·KL/N_pixels)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_config(path: Path, cfg: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))


def read_run_config(run: Path) -> dict:
    f = run / "config.yaml"
    if not f.exists():
        raise InputError("has no config.yaml: not a drgn train run directory", run)
    try:
        return yaml.safe_load(f.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"unreadable run configuration ({e})", f) from None


@dataclass
class Progress:
    """Where training stands: restored from, and saved into, checkpoints."""

    epoch: int = 0                       # epoch in progress (0-based); == epochs when training is done
    step: int = 0                        # batches of that epoch already done
    sums: list[float] = field(default_factory=lambda: [0.0] * 4)  # loss·B, mse·B, kl·B, images
    seconds: float = 0.0                 # training time of that epoch so far
    log: list[dict] = field(default_factory=list)
    stopped: str | None = None           # --epochs auto: why training stopped early (None: not stopped)


# ---- checkpoints --------------------------------------------------------------------------------------
def save_checkpoint(path: Path, model: HetVAE, opt: torch.optim.Optimizer, gen: torch.Generator,
                    state: Progress, run_config: dict | None = None,
                    schedule: LrSchedule | None = None) -> None:
    """Everything a resumed run needs; plain tensors and Python values so weights_only loading works.

    The run's config.yaml travels inside (`run_config`): a workflow manager deletes a killed job's declared
    outputs, config.yaml among them, before it reruns the job, and --auto-resume rebuilds the run from here.
    """
    payload = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
               "rng": gen.get_state(), "epoch": state.epoch, "step": state.step,
               "sums": [float(x) for x in state.sums], "seconds": state.seconds, "log": state.log,
               "model_config": model.cfg.to_dict(), "run_config": run_config, "stopped": state.stopped,
               "lr_schedule": schedule.record() if schedule is not None else None}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def restore_checkpoint(path: Path, model: HetVAE, opt: torch.optim.Optimizer,
                       gen: torch.Generator) -> Progress:
    """Load weights, optimizer moments and generator state in place; return where training stood."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"cannot load checkpoint ({type(e).__name__}: {e})", path) from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise InputError("is not a drgnflow training checkpoint", path)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    gen.set_state(ck["rng"])
    return Progress(ck["epoch"], ck["step"], list(ck["sums"]), ck["seconds"], list(ck["log"]),
                    ck.get("stopped"))


# ---- the run ------------------------------------------------------------------------------------------
def train(table_path: str | os.PathLike, stack_path: str | os.PathLike, outdir: str | os.PathLike,
          model_opts: dict | None = None, train_opts: dict | None = None,
          ind_path: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
          auto_resume: bool = False, allow_pickle: bool = False) -> Path:
    """Train (or resume) a run in `outdir`; returns its path.

    `allow_pickle` admits a cryoDRGN index pickle as `ind_path` (drgn_core.io.indices.read_index_file).

    `model_opts` (keys of ModelConfig such as zdim, enc_dim, pe_type) and `train_opts` (keys of
    TrainConfig) hold the options the caller set; the rest take their defaults, or on resume the run's
    stored values (an explicit option that contradicts the run is refused, except those in RESUMABLE).
    `auto_resume` resumes when `outdir` holds a checkpoint of the same run, and otherwise starts afresh
    (see auto_resume_possible).

    Started by torchrun (WORLD_SIZE > 1 in the environment), every process runs this function: rank 0
    alone writes the run directory, the others train their share of each global batch (drgn_core.distributed).
    """
    dist = from_env()
    ok = False
    try:
        out = _train(dist, table_path, stack_path, outdir, model_opts, train_opts, ind_path, resume,
                     progress and dist.is_main, auto_resume, allow_pickle)
        ok = True
        return out
    finally:
        dist.close(wait=ok)  # after a failure, leave without waiting for the others (torchrun stops them)


def _train(dist: Dist, table_path, stack_path, outdir, model_opts, train_opts, ind_path, resume: bool,
           progress: bool, auto_resume: bool, allow_pickle: bool = False) -> Path:
    run = Path(outdir)
    main = dist.is_main
    model_opts, train_opts = dict(model_opts or {}), dict(train_opts or {})
    # --auto-resume continues the same experiment; a new learning rate takes an explicit --resume
    allowed = RESUMABLE - {"lr"} if auto_resume and not resume else RESUMABLE
    if auto_resume and not resume:  # decided (and a leftover removed) by rank 0 alone
        resume = dist.broadcast(auto_resume_possible(run, model_opts, train_opts, table_path, stack_path,
                                                     ind_path) if main else None)
    stored = read_run_config(run) if resume else None
    if stored is not None:
        _refuse_conflicts(stored["model"], model_opts, run)
        _refuse_conflicts(stored["training"], train_opts, run, allowed)
        resumable = {k: v for k, v in train_opts.items() if k in allowed}
        tcfg = TrainConfig.from_dict({**stored["training"], **resumable})
    else:
        if (run / "config.yaml").exists():
            raise DrgnError(f"{run}: already holds a training run; pass --resume to continue it, or choose "
                            "another output directory")
        tcfg = TrainConfig.from_dict(train_opts)
    if tcfg.stream_cache not in ("run", "off"):  # recorded absolute: a resume may start elsewhere
        tcfg.stream_cache = str(Path(tcfg.stream_cache).expanduser().absolute())
    dist.barrier()  # every rank has looked at the directory before rank 0 writes into it

    # ---- inputs
    table = read_table(table_path)
    source = open_particles(stack_path, table)
    rows = load_rows(ind_path, len(table), allow_pickle)
    if stored is not None and main:  # checksums of a stack of many GB: read once, by rank 0
        _check_same_inputs(stored["inputs"], table_path, stack_path, ind_path)
    train_pos, val_pos = split_validation(len(rows), tcfg.val_frac, tcfg.seed)
    train_pos = choose_train_subset(train_pos, tcfg.train_subset, tcfg.seed)  # --train-subset (else all)
    if tcfg.lr_decay_epochs is None:  # the schedule's horizon is fixed when the run starts
        tcfg.lr_decay_epochs = tcfg.epochs
    schedule = _schedule(tcfg, math.ceil(len(train_pos) / tcfg.batch_size))

    # ---- device, threads, precision, model configuration
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    device = rank_device(resolve_device(tcfg.device), dist)
    amp = resolve_precision(tcfg.precision, device)
    lattice = HalfLattice(source.D)
    restricted = curriculum_epochs(resolve_curriculum(tcfg.curriculum, source.D, tcfg.epochs))  # checked here
    if not 0.0 < tcfg.pixel_keep <= 1.0:
        raise DrgnError(f"--pixel-keep must be in (0, 1], got {tcfg.pixel_keep}")
    if tcfg.pixel_by not in ("ctf2", "snr"):
        raise DrgnError(f"--pixel-by must be ctf2 or snr, got {tcfg.pixel_by!r}")
    if stored is not None:
        mcfg = ModelConfig.from_dict(stored["model"])
        if mcfg.D != source.D:
            raise InputError(f"images are {source.D} px but the run was trained at D = {mcfg.D}", stack_path)
        stored["training"] = asdict(tcfg)  # record what a resumed run may change (e.g. more epochs)
        run_config = stored
    else:
        opts = {"zdim": 10, **{k: model_opts[k] for k in MODEL_OPTIONS if k in model_opts}}
        if opts["zdim"] < 0:
            raise DrgnError("--zdim must be >= 0")
        train_rows = rows[train_pos]  # normalisation measured once, on training images only
        scale = estimate_norm_scale(source, train_rows, table.subset(train_rows).shifts_px(source.apix),
                                    lattice, tcfg.seed)
        mcfg = ModelConfig(D=source.D, norm_scale=scale, apix=source.apix, **opts)
        if main:
            run.mkdir(parents=True, exist_ok=True)
        run_config = dist.broadcast(_run_config(mcfg, tcfg, table_path, stack_path, ind_path, source,
                                                len(rows), len(train_pos), len(val_pos)) if main else None)
    prev_world = int((run_config.get("distributed") or {}).get("world_size", 1))  # before this start
    run_config["distributed"] = _distributed_record(dist, tcfg, device)
    before_lr = (run_config.get("lr_schedule") or {}).get("base_lr")  # a resumed run's base rate
    run_config["lr_schedule"] = schedule.record()
    if main:
        write_config(run / "config.yaml", run_config)
    beta = tcfg.beta if tcfg.beta is not None else (1.0 / mcfg.zdim if mcfg.zdim else 0.0)

    # ---- model, optimizer, generator; restored from the last checkpoint on resume
    torch.manual_seed(tcfg.seed)
    model = HetVAE(mcfg, generator=torch.Generator().manual_seed(tcfg.seed)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    gen = torch.Generator(device=device)
    gen.manual_seed(tcfg.seed + 1)
    state = Progress()
    ck_path = run / "checkpoints" / "last.pt"
    if resume and ck_path.exists():
        state = restore_checkpoint(ck_path, model, opt, gen)
        if main:
            log(f"resuming {run} at epoch {state.epoch + 1}, batch {state.step} with {dist.world} "
                f"process{'es' if dist.world > 1 else ''}")
            _record_resume(run, run_config, prev_world, state, dist)
        if state.stopped and not tcfg.auto_stop:  # --resume --epochs N: train on past the automatic stop
            if main:
                log(f"continuing past the automatic stop after epoch {state.epoch} to {tcfg.epochs} epochs")
            state.stopped = None
        old_lr = before_lr if before_lr is not None else opt.param_groups[0]["lr"]
        if old_lr != schedule.base and main:  # Adam's moments are kept; only the step size changes
            log(f"learning rate {old_lr:g} -> {schedule.base:g} from epoch {state.epoch + 1}")
        set_lr(opt, schedule.lr(state.epoch * math.ceil(len(train_pos) / tcfg.batch_size) + state.step))

    cache_dir = stream_cache_dir(run, tcfg.stream_cache)
    data = ParticleData(source, table, rows, lattice, mcfg.norm_scale, device, tcfg.data_mode, tcfg.chunk,
                        progress, mix=tcfg.mix_chunks, cache_dir=cache_dir,
                        stack_checksum=run_config["inputs"]["stack_sha256"], share=(dist.rank, dist.world),
                        prune=tcfg.stream_cache == "run")
    n_params = sum(p.numel() for p in model.parameters())
    if dist.active and main:
        log(f"{dist.world} processes ({dist.backend}): global batch {tcfg.batch_size}, about "
            f"{math.ceil(tcfg.batch_size / dist.world)} images per process and step, lr {tcfg.lr:g}")
    if main:
        log(f"training on {len(train_pos)} images ({len(val_pos)} held out), D = {mcfg.D}, "
            f"zdim = {mcfg.zdim}, {n_params:,} parameters, {device}, {'bf16' if amp else 'fp32'}, "
            f"data in {data.mode}")

    # ---- the loop
    model.train()
    auto = AutoStop(run, tcfg, device) if tcfg.auto_stop else None
    snr = snr_by_radius(data, train_pos) if tcfg.pixel_keep < 1 and tcfg.pixel_by == "snr" else None
    while state.epoch < tcfg.epochs and not state.stopped:
        pixels = decoder_pixels(model, tcfg.curriculum, tcfg.pixel_keep, state.epoch, tcfg.epochs, snr)
        run_epoch(model, opt, gen, data, train_pos, tcfg, beta, amp, state, ck_path, run_config, progress,
                  dist, pixels, schedule)
        val = evaluate(model, data, val_pos, beta, amp, dist=dist, pixels=pixels)
        s_loss, s_mse, s_kl, n_img = state.sums
        row = {"epoch": state.epoch + 1, "loss": s_loss / n_img, "mse": s_mse / n_img, "kl": s_kl / n_img,
               "val_loss": val["loss"], "val_mse": val["mse"], "val_kl": val["kl"],
               "images_per_s": n_img / max(state.seconds, 1e-9), "seconds": state.seconds,
               "peak_mem_MiB": peak_memory_mib(device), "lr": opt.param_groups[0]["lr"],
               "radius": mcfg.D // 2 if pixels is None else pixels.radius,
               "decoder_points": lattice.P if pixels is None else pixels.points}
        if auto is not None:  # snapshot this epoch, compare it with the last, decide (every rank encodes)
            mu, _ = encode_latents(model, data, amp, progress=progress, dist=dist, pixels=pixels)
            if main:
                save_snapshot(run, model, mcfg, row["epoch"], mu, amp)
                row.update(auto.compare(row["epoch"], mu))
            # never during the curriculum: its epochs change the radius, not the answer's convergence
            state.stopped = dist.broadcast(auto.decide(row, state.log) if main and row["epoch"] > restricted
                                           else None)
        state.log.append({k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()})  # plain types
        if state.stopped and main:
            log(f"{run}: {state.stopped}")
        if main:
            log(f"epoch {row['epoch']}/{tcfg.epochs}  loss {row['loss']:.5f}  mse {row['mse']:.5f}  "
                f"kl {row['kl']:.3f}  val {row['val_loss']:.5f}  {row['images_per_s']:.1f} img/s  "
                f"{state.seconds:.0f} s  peak {row['peak_mem_MiB']:.0f} MiB")
            write_log(run / "train_log.csv", state.log)
        state.epoch, state.step, state.sums, state.seconds = state.epoch + 1, 0, [0.0] * 4, 0.0
        done = state.epoch == tcfg.epochs or bool(state.stopped)
        if tcfg.encode_every and state.epoch % tcfg.encode_every == 0 and not done and auto is None:
            mu, _ = encode_latents(model, data, amp, progress=progress, dist=dist, pixels=pixels)  # all ranks
            if main:
                save_snapshot(run, model, mcfg, state.epoch, mu, amp)
        if main and (state.epoch % tcfg.checkpoint_every == 0 or done):
            save_checkpoint(ck_path, model, opt, gen, state, run_config, schedule)

    note = overfitting_note([r for r in state.log if r.get("radius", mcfg.D // 2) >= mcfg.D // 2])
    if note and main:
        log(f"{run}: {note}")

    # ---- final outputs; model.pt last, so that its presence means a finished run
    mu, logvar = encode_latents(model, data, amp, progress=progress, dist=dist)
    if not main:
        return run
    if data.cache is not None and tcfg.stream_cache == "run":  # every rank is done reading it
        data.cache.remove()
        log(f"removed the prepared-image cache {data.cache.folder}")
    save_npy(run / "z.npy", mu)
    save_npy(run / "z_logvar.npy", logvar)
    write_index_files(rows, run / "indices.npy")
    write_index_files(rows[val_pos], run / "val_indices.npy")
    if tcfg.train_subset:
        write_index_files(rows[train_pos], run / "train_indices.npy")
    write_log(run / "train_log.csv", state.log)
    plot_learning_curve(run / "learning_curve.png", state.log)
    run_config["stopped"] = stop_record(tcfg, state)
    write_config(run / "config.yaml", run_config)
    if auto is not None:
        auto.plot(state.log, state.epoch if state.stopped else None)
    with atomic_path(run / "model.pt") as tmp:
        # the precision travels with the model so that `drgn encode` reproduces z.npy
        torch.save(model_payload(model, mcfg, epochs=state.epoch, precision="bf16" if amp else "fp32"), tmp)
    return run


def stop_record(tcfg: TrainConfig, state: Progress) -> dict:
    """config.yaml's `stopped` entry: after how many epochs training ended, and why (the summary shows it)."""
    if state.stopped:
        reason = state.stopped
    elif tcfg.auto_stop:
        reason = (f"reached the maximum of {tcfg.epochs} epochs (--max-epochs) before the latent and maps "
                  "settled: train longer, or look at convergence.png")
    else:
        reason = f"trained the {tcfg.epochs} epochs asked (--epochs)"
    return {"epoch": int(state.epoch), "auto": bool(tcfg.auto_stop), "max_epochs": int(tcfg.epochs),
            "early": bool(state.stopped), "reason": reason}


class AutoStop:
    """--epochs auto inside the training loop: compares each epoch's snapshot with the previous one
    (drgn_core.convergence) and applies its stopping rule. Runs on rank 0; the decision is broadcast.

    The on-data points whose maps are compared are chosen once, at the first comparison, and kept in
    checkpoints/map_rows.npy so that a resumed run follows the same particles. The previous epoch's
    latent and maps are kept in memory (or re-read from its snapshot after a resume), so each epoch's maps
    are decoded once.
    """

    def __init__(self, run: Path, tcfg: TrainConfig, device: torch.device):
        self.run, self.tcfg, self.device = run, tcfg, str(device)
        self.prev: tuple[int, np.ndarray, np.ndarray | None] | None = None  # (epoch, z, maps at rows)

    def _rows(self, z: np.ndarray) -> np.ndarray:
        from drgn_core.convergence import MAP_POINTS, choose_rows

        f = self.run / "checkpoints" / "map_rows.npy"
        if f.exists():
            return np.load(f, allow_pickle=False)
        rows = choose_rows(z, MAP_POINTS, self.tcfg.seed)
        save_npy(f, rows)
        return rows

    def compare(self, epoch: int, z: np.ndarray) -> dict:
        """The measures between epoch-1 and `epoch` (NaN at the first epoch)."""
        from drgn_core.convergence import Snapshot, epoch_pair

        ck = self.run / "checkpoints"
        cur = Snapshot(epoch, ck / f"z.{epoch:03d}.npy", ck / f"model.{epoch:03d}.pt")
        prev = Snapshot(epoch - 1, ck / f"z.{epoch - 1:03d}.npy", ck / f"model.{epoch - 1:03d}.pt")
        if epoch < 2 or not prev.z.exists() or not prev.model.exists():
            return {"latent_change": math.nan, "neighbours_kept": math.nan, "map_agreement": math.nan}
        rows = self._rows(z)
        z_prev = vols_prev = None
        if self.prev is not None and self.prev[0] == epoch - 1:
            _, z_prev, vols_prev = self.prev
        m, z_cur, vols = epoch_pair(prev, cur, rows, self.tcfg.seed, self.device, z_prev, vols_prev)
        self.prev = (epoch, z_cur, vols)
        return {k: m[k] for k in ("latent_change", "neighbours_kept", "map_agreement")}

    def decide(self, row: dict, history: list[dict]) -> str | None:
        """The stopping rule on the epochs so far (`history` without this epoch's row, then `row`)."""
        from drgn_core.convergence import settled

        rows = [*history, row]
        pairs = [{"epoch": int(r["epoch"]), "latent_change": r["latent_change"],
                  "neighbours_kept": r["neighbours_kept"], "map_agreement": r["map_agreement"]}
                 for r in rows if not math.isnan(r.get("latent_change", math.nan))]
        return settled(pairs, int(row["epoch"]))

    def plot(self, log_rows: list[dict], stop: int | None) -> None:
        """RUN/convergence.png: the measures that decided when to stop."""
        from drgn_core.convergence import plot_convergence

        pairs = [{"epoch": r["epoch"], **{k: r.get(k) for k in ("latent_change", "neighbours_kept",
                                                                 "map_agreement")}}
                 for r in log_rows if not math.isnan(r.get("latent_change", math.nan))]
        if pairs:
            plot_convergence(pairs, self.run / "convergence.png", stop)


def overfitting_note(rows: list[dict], patience: int = 3, tolerance: float = 1e-3) -> str | None:
    """A warning when the validation loss bottomed out `patience`+ epochs before the end and has risen
    by more than `tolerance` (relative) since, while the training loss kept falling.

    That is the encoder memorising its training images: the held-out particles' latents then come from a
    mapping that does not generalise, and a user who analyses them should know.
    """
    val = [(r["epoch"], r["val_loss"]) for r in rows if not math.isnan(r["val_loss"])]
    if len(val) <= patience:
        return None
    best_epoch, best = min(val, key=lambda t: t[1])
    last_epoch, last = val[-1]
    train = {r["epoch"]: r["loss"] for r in rows}
    if (last_epoch - best_epoch < patience or last <= best * (1 + tolerance)
            or train[last_epoch] >= train[best_epoch]):
        return None
    return (f"the validation loss has risen since epoch {best_epoch} ({best:.5f} -> {last:.5f}) while the "
            f"training loss fell ({train[best_epoch]:.5f} -> {train[last_epoch]:.5f}): the model over-fits "
            "its training images, and the latents of the held-out particles (val_indices.npy) are unreliable")


def run_epoch(model: HetVAE, opt: torch.optim.Optimizer, gen: torch.Generator, data: ParticleData,
              train_pos: np.ndarray, tcfg: TrainConfig, beta: float, amp: torch.dtype | None, state: Progress,
              ck_path: Path, run_config: dict, progress: bool, dist: Dist | None = None,
              pixels: DecoderPixels | None = None, schedule: LrSchedule | None = None) -> None:
    """Train the rest of epoch `state.epoch` from batch `state.step`, checkpointing mid-epoch on a timer.

    `state.step` counts global batches. With several processes, every rank draws the epoch's order (a
    function of seed and epoch), takes its slice of each global batch, and the gradients of
    loss · b_rank / B are summed over ranks before the (identical) optimizer step on every rank; rank 0
    writes the checkpoints, whose contents every rank shares. `schedule` sets the rate of every step
    (drgn_core.schedule; None: the optimizer's rate stays as it is).
    """
    dist = dist or Dist()
    main = dist.is_main
    steps = math.ceil(len(train_pos) / tcfg.batch_size)
    order = data.epoch_order(train_pos, tcfg.seed, state.epoch)
    # running sums loss·B, mse·B, kl·B stay on the device (no host sync per step); images on the host
    acc = torch.tensor(state.sums[:3], dtype=torch.float64, device=data.device)
    n_img = state.sums[3]
    params = [p for p in model.parameters() if p.requires_grad]
    step_rows: list[str] = []
    bar = progress_bar(total=steps, initial=state.step, desc=f"epoch {state.epoch + 1}/{tcfg.epochs}",
                       unit="batch", disable=not progress, leave=False, mininterval=1.0, file=sys.stderr)
    t0 = last_save = time.perf_counter()
    seconds0 = state.seconds
    for batch in data.batches(order, tcfg.batch_size, start=state.step * tcfg.batch_size, rank=dist.rank,
                              world=dist.world):
        b = len(batch.pos)
        opt.zero_grad(set_to_none=True)
        if dist.active:
            n_glob = batch.n_global
            if b:
                loss, mse, kl = batch_loss(model, batch, beta, amp, gen, pixels)
                (loss * (b / n_glob)).backward()  # summed over ranks: the global batch's mean loss
                local = torch.stack([loss.detach(), mse.detach(), kl.detach()]).double() * b
            else:  # no image of this batch here: keep the shared generator in step, contribute zeros
                if model.zdim > 0:
                    torch.randn((n_glob, model.zdim), generator=gen, device=data.device)
                local = torch.zeros(3, dtype=torch.float64, device=data.device)
            summed = sum_gradients_(params, local, dist)
            step_sums, b_step = summed, n_glob
        else:
            loss, mse, kl = batch_loss(model, batch, beta, amp, gen, pixels)
            loss.backward()
            step_sums, b_step = torch.stack([loss.detach(), mse.detach(), kl.detach()]).double() * b, b
        if schedule is not None:
            set_lr(opt, schedule.lr(state.epoch * steps + state.step))
        opt.step()
        acc += step_sums
        n_img += b_step
        state.step += 1
        if tcfg.log_steps and main:
            s_loss, s_mse, s_kl = (step_sums / b_step).tolist()
            step_rows.append(f"{state.epoch + 1},{state.step},{b_step},{s_loss:.9g},{s_mse:.9g},{s_kl:.9g},"
                             f"{opt.param_groups[0]['lr']:.9g}\n")
        bar.update(1)
        if state.step % 50 == 0:
            bar.set_postfix(loss=f"{acc[0].item() / n_img:.4f}", refresh=False)
        now = time.perf_counter()
        if main and 0 < tcfg.checkpoint_minutes * 60 < now - last_save and state.step < steps:
            state.sums, state.seconds = [*acc.tolist(), n_img], seconds0 + now - t0
            _append_steps(ck_path.parent.parent, step_rows)
            save_checkpoint(ck_path, model, opt, gen, state, run_config, schedule)
            last_save = now
    bar.close()
    state.sums, state.seconds = [*acc.tolist(), n_img], seconds0 + time.perf_counter() - t0
    if main:
        _append_steps(ck_path.parent.parent, step_rows)


def _append_steps(run: Path, rows: list[str]) -> None:
    """Add rows to train_steps.csv (--log-steps). A resumed run repeats the steps done after its last
    checkpoint; the last row of an (epoch, step) pair is the one that counts."""
    if not rows:
        return
    f = run / "train_steps.csv"
    new = not f.exists()
    with open(f, "a") as fh:
        if new:
            fh.write("epoch,step,images,loss,mse,kl,lr\n")
        fh.writelines(rows)
    rows.clear()


def _schedule(tcfg: TrainConfig, steps_per_epoch: int) -> LrSchedule:
    """The run's learning rate at every step, from its settings (drgn_core.schedule)."""
    return schedule_for(tcfg.lr, tcfg.batch_size, steps_per_epoch, kind=tcfg.lr_schedule,
                        warmup_epochs=tcfg.warmup_epochs, final=tcfg.lr_final, drops=tcfg.lr_drops,
                        scale=tcfg.lr_scale, ref_batch=tcfg.lr_ref_batch, horizon_epochs=tcfg.lr_decay_epochs)


def _distributed_record(dist: Dist, tcfg: TrainConfig, device: torch.device) -> dict:
    """config.yaml's `distributed` entry: how many processes trained, and the global batch and learning
    rate they used (the batch is global: processes split it, so the lr needs no rescaling)."""
    return {"world_size": dist.world, "backend": dist.backend if dist.active else "none",
            "device_type": device.type, "global_batch": tcfg.batch_size,
            "batch_per_process": math.ceil(tcfg.batch_size / dist.world), "lr": tcfg.lr}


def _record_resume(run: Path, run_config: dict, before: int, state: Progress, dist: Dist) -> None:
    """Note a resume in config.yaml (`resumes`), and say so when the number of processes changed."""
    entry = {"epoch": state.epoch + 1, "batch": state.step, "world_size": dist.world,
             "previous_world_size": before, "at": datetime.now(UTC).isoformat(timespec="seconds")}
    run_config["resumes"] = [*run_config.get("resumes", []), entry]
    if before != dist.world:
        log(f"{run}: resuming with {dist.world} process{'es' if dist.world > 1 else ''} where the run had "
            f"{before}; the global batch ({run_config['training']['batch_size']}) and the order are "
            "unchanged")
    write_config(run / "config.yaml", run_config)


def _run_config(mcfg: ModelConfig, tcfg: TrainConfig, table_path, stack_path, ind_path, source,
                n: int, n_train: int, n_val: int) -> dict:
    """config.yaml: every hyperparameter, the inputs with their checksums, and the software versions."""
    return {
        "model": mcfg.to_dict(),
        "training": asdict(tcfg),
        "inputs": {"table": str(Path(table_path).resolve()), "stack": str(Path(stack_path).resolve()),
                   "ind": str(Path(ind_path).resolve()) if ind_path else None,
                   "table_sha256": sha256(table_path), "stack_sha256": sha256(stack_path),
                   "ind_sha256": sha256(ind_path) if ind_path else None,
                   "n_particles": n, "n_train": n_train, "n_val": n_val, "D": source.D, "apix": source.apix},
        "versions": {"drgnflow": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
                     "python": platform.python_version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def auto_resume_possible(run: Path, model_opts: dict, train_opts: dict, table_path, stack_path,
                         ind_path) -> bool:
    """Whether an --auto-resume run continues from `run`/checkpoints/last.pt.

    Yes when the checkpoint was written by a run with the same settings (those given here; RESUMABLE ones
    such as epochs may differ) and the same data; config.yaml is then restored from the checkpoint if a
    workflow manager deleted it. A checkpoint of some other run is discarded only when it is a leftover
    (no config.yaml beside it: the outputs were already removed, as Snakemake does before a rerun); a
    directory that still holds a complete different run is refused as without --auto-resume. The
    checkpoint of a finished run whose outputs were removed is also discarded (a forced rerun trains
    again), unless more epochs are now asked, which continue it.
    """
    ck_path = run / "checkpoints" / "last.pt"
    if not ck_path.exists():
        return False
    if (run / "config.yaml").exists():  # an intact run: exactly --resume, whose checks refuse another run's
        return True
    try:
        ck = torch.load(ck_path, map_location="cpu", weights_only=True)
        stored = ck.get("run_config")
        if not isinstance(stored, dict):
            raise DrgnError(f"{ck_path}: the checkpoint does not record its run's settings")
        _refuse_conflicts(stored["model"], model_opts, run)
        _refuse_conflicts(stored["training"], train_opts, run, RESUMABLE - {"lr"})  # as in train()
        _check_same_inputs(stored["inputs"], table_path, stack_path, ind_path)
        wanted = train_opts.get("epochs", stored["training"]["epochs"])
        if ck["epoch"] >= wanted or ck.get("stopped"):  # finished, outputs removed: a rerun was forced
            raise DrgnError(f"it finished {ck['epoch']} epochs and {wanted} are asked")
    except Exception as e:  # unreadable, or another run's: a leftover, discarded
        log(f"{run}: not resuming from the leftover checkpoint ({e}); starting afresh")
        shutil.rmtree(run / "checkpoints")
        return False
    write_config(run / "config.yaml", stored)
    return True


def _check_same_inputs(stored: dict, table_path, stack_path, ind_path) -> None:
    """A resumed run must see the same data: compare the inputs' checksums with the recorded ones."""
    for key, p in (("table", table_path), ("stack", stack_path), ("ind", ind_path)):
        want, have = stored.get(f"{key}_sha256"), (sha256(p) if p else None)
        if want != have:
            raise DrgnError(f"{p or 'no --ind'}: the run started with {key} {stored.get(key)} (different "
                            "content); a resumed run must use the same data")
