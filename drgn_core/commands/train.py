"""`drgn train`: train a cryoDRGN VAE (or, with --zdim 0, a homogeneous decoder) on a particle stack."""

from __future__ import annotations

import argparse

HELP = "train the cryoDRGN model (encoder + volume decoder) on a downsampled stack"
DESCRIPTION = """\
Train cryoDRGN's image-encoder / volume-decoder network on particles with known poses (a consensus
refinement's), writing a run directory: config.yaml, model.pt, z.npy (posterior means, rows aligned to
indices.npy), z_logvar.npy, indices.npy, train_log.csv, learning_curve.png and checkpoints/.

A random --val-frac of the particles is held out and its loss reported every epoch. A run killed at any
moment continues from its last checkpoint with --resume (same command plus --resume; --epochs may be
raised to train longer, and --lr lowered to refine a run whose loss has levelled off); on the CPU the
result is identical to an uninterrupted run.

Defaults follow the paper: Adam, learning rate 1e-4, batch 8, 256×3 encoder and decoder, Gaussian
positional encoding (σ 0.5), β = 1/zdim. bf16 autocast is used where the hardware has bf16 arithmetic
(recent GPUs; CPUs with AVX-512 BF16 or AMX): measured 2.2-3.6× faster on the CPU with the same accuracy.

Several devices (data-parallel, torch.distributed: NCCL between GPUs, gloo between CPU processes):
--nproc N (alias --gpus N) starts N processes on this node through torchrun, one per GPU; each trains its
share of every global batch (--batch-size is the global batch; the learning rate is not rescaled). On
several nodes, start one `drgn train ... --nproc G --nnodes N` per node (srun does), which rendezvous at
--rdzv (default: the first node of the SLURM allocation). A run may be resumed on another number of
processes; config.yaml records each resume (`resumes`) and the processes used (`distributed`).

Example:
  drgn train table.star particles.128.mrcs -o runs/pilot --zdim 10 --epochs 50
  drgn train table.star particles.128.mrcs -o runs/auto --zdim 10 --epochs auto --max-epochs 60
  drgn train table.star particles.128.mrcs -o runs/fast --zdim 10 --epochs 20 --curriculum 0.25:4 \\
      --pixel-keep 0.7
  drgn train table.star particles.128.mrcs -o runs/pilot4 --zdim 10 --gpus 4
  srun --nodes 2 --ntasks-per-node 1 --gpus-per-node 4 \\
      drgn train table.star particles.256.mrcs -o runs/big --zdim 10 --gpus 4 --nnodes 2
  drgn train table.star particles.256.mrcs -o runs/highres --zdim 10 --ind kept.npy \\
      --enc-dim 1024 --dec-dim 1024 --epochs 25
  drgn train table.star particles.128.mrcs -o runs/cos --zdim 10 --lr-schedule cosine \\
      --warmup-epochs 1
  drgn train table.star particles.128.mrcs -o runs/big --zdim 10 --batch-size 64 --lr-scale sqrt
  drgn train table.star particles.128.mrcs -o runs/sub --zdim 10 --train-subset 20000 --val-frac 0
"""

# Option name → (model or training key). Defaults are None so that --resume can tell which were given.
MODEL_KEYS = ("zdim", "enc_dim", "enc_layers", "dec_dim", "dec_layers", "pe_type", "pe_dim", "feat_sigma",
              "enc_mask")
TRAIN_KEYS = ("epochs", "auto_stop", "batch_size", "lr", "beta", "seed", "device", "precision", "threads",
              "val_frac",
              "checkpoint_every", "checkpoint_minutes", "data_mode", "chunk", "mix_chunks",
              "encode_every", "log_steps", "stream_cache", "curriculum", "pixel_keep", "pixel_by",
              "lr_schedule", "warmup_epochs", "lr_final", "lr_drops", "lr_decay_epochs", "lr_scale",
              "lr_ref_batch", "train_subset")


def add_network_arguments(m: argparse._ArgumentGroup) -> None:
    """The encoder's and decoder's size and positional-encoding options, shared by drgn train and drgn
    abinit (one model, one set of flags)."""
    m.add_argument("--enc-dim", type=int, help="encoder width (default 256; paper high-res 1024)")
    m.add_argument("--enc-layers", type=int, help="encoder hidden layers (default 3)")
    m.add_argument("--dec-dim", type=int, help="decoder width (default 256; paper high-res 1024)")
    m.add_argument("--dec-layers", type=int, help="decoder hidden layers (default 3)")
    m.add_argument("--pe-type", choices=["gaussian", "geom"],
                   help="positional encoding: random Gaussian features or the paper's geometric sinusoids "
                        "(default gaussian)")
    m.add_argument("--pe-dim", type=int, help="encoding frequencies per axis (default D/2)")
    m.add_argument("--feat-sigma", type=float, help="σ of the Gaussian features (default 0.5)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", help="canonical particle table (drgn import / drgn simulate)")
    p.add_argument("stack", help="particle stack whose row i is table row i (drgn downsample)")
    p.add_argument("-o", "--outdir", required=True, help="run directory to write")
    p.add_argument("--ind", help="index file (.npy or .txt) of table rows to train on (default: all)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a cryoDRGN index pickle (*.ind.pkl) as --ind (restricted unpickler)")
    p.add_argument("--resume", action="store_true", help="continue the run in --outdir from its checkpoint")
    p.add_argument("--auto-resume", action="store_true",
                   help="continue from --outdir's checkpoint when it holds one of this same run (same "
                        "settings and data), else start afresh; for workflow managers that rerun a killed "
                        "job after deleting its outputs (the workflow passes it)")
    m = p.add_argument_group("model")
    m.add_argument("--zdim", type=int, help="latent dimension; 0 = homogeneous reconstruction (default 10)")
    add_network_arguments(m)
    m.add_argument("--enc-mask", type=int,
                   help="encoder input: transform pixels within this radius (px) only (default D/2: all)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=_epochs,
                   help="passes over the training images (default 20), or 'auto': stop once the latent and "
                        "the maps no longer change between epochs (drgn convergence's measures; at most "
                        "--max-epochs). config.yaml's `stopped` says after which epoch and why")
    t.add_argument("--max-epochs", type=int,
                   help=f"with --epochs auto: the most epochs to train (default {AUTO_MAX})")
    t.add_argument("--batch-size", type=int, help="images per batch (default 8)")
    t.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4)")
    t.add_argument("--beta", type=float, help="KL weight β (default 1/zdim)")
    t.add_argument("--seed", type=int, help="random seed: split, order, initialisation, sampling (default 0)")
    t.add_argument("--curriculum", type=_curriculum, metavar="R:E[,R:E...]",
                   help="train inside a growing Fourier radius first: R px (or a fraction of the box, "
                        "0.25 = D/4) for E epochs per phase, then the full circle for the remaining "
                        "--epochs. Inside D/4 an epoch evaluates the decoder at ~1/4 of the pixels and is "
                        "exactly training on a D/2 Fourier crop (default: none)")
    t.add_argument("--pixel-keep", type=float, metavar="F",
                   help="evaluate the decoder at each image's top F of pixels by CTF² (the information "
                        "per pixel), F in (0, 1]: fewer decoder FLOPs per image (default 1: all)")
    t.add_argument("--pixel-by", choices=["ctf2", "snr"],
                   help="with --pixel-keep: rank pixels by CTF² (ctf2), or by CTF² times the spectral SNR "
                        "measured on the training images (snr), which keeps the low-resolution pixels "
                        "where the signal is (default ctf2)")
    t.add_argument("--val-frac", type=float,
                   help="fraction held out for the validation loss (default 0.1). Held-out particles' "
                   "latents come from an encoder that never saw them, and below ~1e5 particles they are "
                   "close to noise: use 0 when every latent will be analysed")
    s = p.add_argument_group("learning-rate schedule and training subset (options to measure; the paper's "
                             "constant rate on every particle is the default)")
    s.add_argument("--lr-schedule", choices=["constant", "cosine", "step"],
                   help="rate over the steps: constant (the paper), cosine decay to --lr-final x lr, or "
                        "--lr-drops equal geometric drops to it (default constant)")
    s.add_argument("--warmup-epochs", type=float,
                   help="linear warm-up of the rate over this many epochs' steps, e.g. 0.5 (default 0)")
    s.add_argument("--lr-final", type=float,
                   help="cosine/step: the rate at the end of the decay as a fraction of the peak "
                        "(default 0.1)")
    s.add_argument("--lr-drops", type=int, help="step: number of drops, evenly spaced (default 2)")
    s.add_argument("--lr-decay-epochs", type=int,
                   help="the decay's length in epochs; the rate stays at its final value after it "
                        "(default: --epochs, or --max-epochs with --epochs auto)")
    s.add_argument("--lr-scale", choices=["none", "sqrt", "linear"],
                   help="scale --lr for the batch: lr x (batch-size / lr-ref-batch)^(1/2 or 1); "
                        "config.yaml's lr_schedule.base_lr records the rate used (default none)")
    s.add_argument("--lr-ref-batch", type=int, help="the batch size --lr suits, for --lr-scale (default 8)")
    s.add_argument("--train-subset", type=_subset, metavar="N|F",
                   help="train on a seeded random N particles (or fraction F) of the training rows, then "
                        "encode every particle into z.npy; train_indices.npy lists the rows trained on. "
                        "Needs enough rows for the encoder to generalise (see docs/usage.md) (default: all)")
    r = p.add_argument_group("resources")
    r.add_argument("--device", help="auto (GPU when present), cpu, cuda or cuda:N (default auto)")
    r.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 autocast where the GPU or CPU has native bf16, fp32 otherwise "
                        "(default auto)")
    r.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    r.add_argument("--data-mode", choices=["auto", "memory", "stream"],
                   help="hold the prepared images in memory or stream chunks from the stack (default auto)")
    r.add_argument("--chunk", type=int,
                   help="images per streamed chunk, read in one go (default 0: as many as make 8 MiB once "
                        "prepared, e.g. 650 at D = 64)")
    r.add_argument("--mix-chunks", type=int,
                   help="streamed chunks, in random order, whose images are shuffled together: batches mix "
                        "particles from distant parts of the stack; memory ~3 x chunk x mix (default 4)")
    r.add_argument("--stream-cache", metavar="run|off|DIR",
                   help="streamed data: prepare the images once, before the first epoch, into a cache on "
                        "disk that later epochs read (float32 on the CPU, float16 on a GPU: about 0.8 x "
                        "D^2 x 4 bytes per image, or half). 'run' = RUN/stream_cache, removed when training "
                        "finishes; a folder is kept and shared by runs on the same data and seed; 'off' "
                        "prepares every epoch again (default run)")
    r.add_argument("--nproc", "--gpus", dest="nproc", type=int, default=1,
                   help="processes on this node, one per GPU (or CPU processes, gloo, without GPUs); > 1 "
                        "re-executes this command through torchrun (default 1)")
    r.add_argument("--nnodes", type=int, default=1,
                   help="nodes taking part; run the same command on each, e.g. by srun (default 1)")
    r.add_argument("--rdzv", help="HOST[:PORT] where the nodes meet (default: the first node of the SLURM "
                                  "allocation, port 29500)")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints (default 1)")
    c.add_argument("--checkpoint-minutes", type=float,
                   help="also checkpoint within an epoch after this many minutes; 0 = never (default 30)")
    c.add_argument("--encode-every", type=int,
                   help="also save checkpoints/z.EEE.npy and model.EEE.pt (that epoch's latents and "
                        "weights, for drgn convergence) every N epochs (default 0: only at the end)")
    c.add_argument("--log-steps", action="store_true", default=None,
                   help="also write train_steps.csv: the global batch's loss, MSE and KL at every step")


AUTO_MAX = 50  # = drgn_core.convergence.AUTO_DEFAULT_MAX_EPOCHS (not imported: this module stays light)


def _epochs(text: str) -> int | str:
    """--epochs: a whole number, or 'auto'."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def _curriculum(text: str) -> str:
    """--curriculum: 'R:E,...' checked for its form here (radii against the box when training starts)."""
    from drgn_core.curriculum import parse_curriculum
    from drgn_core.errors import DrgnError

    try:
        parse_curriculum(text)
    except DrgnError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return ",".join(p.strip() for p in text.split(","))


def _subset(text: str) -> float:
    """--train-subset: a count or a fraction (drgn_core.train_subset.parse_subset)."""
    from drgn_core.train_subset import parse_subset

    try:
        return parse_subset(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _given(args: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if out.get("epochs") == "auto":  # the maximum becomes the run's epochs; auto_stop ends it earlier
        out["auto_stop"] = True
        out["epochs"] = args.max_epochs or AUTO_MAX
    elif "epochs" in out:
        out["auto_stop"] = False  # a fixed number (on --resume: also past a run's automatic stop)
    if "epochs" in keys and not out.get("auto_stop") and getattr(args, "max_epochs", None) is not None:
        from drgn_core.errors import DrgnError

        raise DrgnError("--max-epochs is for --epochs auto; with a fixed number of epochs, give --epochs "
                        "only")
    return out


def _validate(opts: dict) -> None:
    from drgn_core.errors import DrgnError

    positive = ("enc_dim", "dec_dim", "epochs", "batch_size", "checkpoint_every", "mix_chunks", "nproc",
                "nnodes", "lr_drops", "lr_decay_epochs", "lr_ref_batch")
    for k in positive:
        if k in opts and opts[k] < 1:
            raise DrgnError(f"--{k.replace('_', '-')} must be >= 1, got {opts[k]}")
    for k in ("enc_layers", "dec_layers", "zdim", "threads", "encode_every", "pe_dim", "enc_mask", "chunk"):
        if k in opts and opts[k] < 0:
            raise DrgnError(f"--{k.replace('_', '-')} must be >= 0, got {opts[k]}")
    if "warmup_epochs" in opts and opts["warmup_epochs"] < 0:
        raise DrgnError(f"--warmup-epochs must be >= 0, got {opts['warmup_epochs']}")
    if "lr_final" in opts and not 0 < opts["lr_final"] <= 1:
        raise DrgnError(f"--lr-final must be in (0, 1], got {opts['lr_final']}")
    for k in ("lr", "feat_sigma"):
        if k in opts and not opts[k] > 0:
            raise DrgnError(f"--{k.replace('_', '-')} must be > 0, got {opts[k]}")
    if "pixel_keep" in opts and not 0.0 < opts["pixel_keep"] <= 1.0:
        raise DrgnError(f"--pixel-keep must be in (0, 1], got {opts['pixel_keep']}")
    if "beta" in opts and opts["beta"] < 0:
        raise DrgnError(f"--beta must be >= 0, got {opts['beta']}")


def _command_line(args: argparse.Namespace) -> list[str]:
    """This command's arguments, rebuilt from `args` without the launch options."""
    out = [args.table, args.stack, "-o", args.outdir]
    out += ["--ind", args.ind] if args.ind else []
    out += ["--resume"] if args.resume else []
    out += ["--auto-resume"] if args.auto_resume else []
    for k, v in {**_given(args, MODEL_KEYS), **_given(args, TRAIN_KEYS)}.items():
        if k == "auto_stop":
            continue
        if k == "epochs" and args.epochs == "auto":
            k, out = "max_epochs", [*out, "--epochs", "auto"]
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


def _rendezvous(args: argparse.Namespace) -> str:
    """HOST:PORT for a multi-node start: --rdzv, else the first host of the SLURM allocation."""
    import os
    import subprocess

    from drgn_core.errors import DrgnError

    spec = args.rdzv
    if not spec:
        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        if not nodes and os.environ.get("SLURM_JOB_ID"):  # a job step that was given only the job's id
            q = subprocess.run(["squeue", "-h", "-j", os.environ["SLURM_JOB_ID"], "-o", "%N"],
                               capture_output=True, text=True)
            nodes = q.stdout.strip() if q.returncode == 0 else None
        if not nodes:
            raise DrgnError("--nnodes > 1 needs --rdzv HOST[:PORT] outside a SLURM allocation")
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.split():
            raise DrgnError(f"cannot list the nodes of SLURM_JOB_NODELIST={nodes} (scontrol show hostnames)")
        spec = out.stdout.split()[0]
    return spec if ":" in spec else f"{spec}:29500"


def launch(args: argparse.Namespace) -> None:
    """Re-execute this command as a torchrun job of --nproc processes per node (does not return).

    One node: torchrun's standalone rendezvous on a free local port. Several: the c10d rendezvous at
    `_rendezvous`, with the SLURM job id (when there is one) naming the job so that a second job on the
    same nodes does not join it.
    """
    import os
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}"]
    if args.nnodes > 1:
        cmd += [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={_rendezvous(args)}",
                f"--rdzv-id={os.environ.get('SLURM_JOB_ID', 'drgn-train')}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "drgn_core.cli", "train", *_command_line(args)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def run(args: argparse.Namespace) -> int:
    import os

    from drgn_core.io.atomic import refuse_overwrite_input
    from drgn_core.train import train

    model_opts, train_opts = _given(args, MODEL_KEYS), _given(args, TRAIN_KEYS)
    _validate({**model_opts, **train_opts, "nproc": args.nproc, "nnodes": args.nnodes})
    if (args.nproc > 1 or args.nnodes > 1) and "WORLD_SIZE" not in os.environ:
        launch(args)
    refuse_overwrite_input([args.outdir], [args.table, args.stack, args.ind])
    if "WORLD_SIZE" in os.environ and os.environ.get("RANK", "0") != "0":
        train(args.table, args.stack, args.outdir, model_opts, train_opts, ind_path=args.ind,
              resume=args.resume, auto_resume=args.auto_resume)
        return 0
    run_dir = train(args.table, args.stack, args.outdir, model_opts, train_opts, ind_path=args.ind,
                    resume=args.resume, auto_resume=args.auto_resume, allow_pickle=args.allow_pickle)
    print(f"trained model written to {run_dir}/model.pt; latents in {run_dir}/z.npy")
    return 0
