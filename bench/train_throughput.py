"""Training throughput (images/s) and peak memory of `drgn train`, optionally against cryoDRGN, as JSON.

For each box size D and architecture (width×layers, same for encoder and decoder) it simulates a small
particle set, runs `drgn train` for a fixed number of epochs in a subprocess (so the whole program, data
preparation included, is measured as a user would run it), and reads images/s of the training loop and
the peak memory from train_log.csv. With a cryoDRGN installation (`--cryodrgn PATH` or `cryodrgn` on PATH,
never imported here) it runs `cryodrgn train_vae` on the same images, poses, CTF, architecture, batch size,
learning rate and epochs, one after the other in the same invocation, and prints the ratio
drgnflow / cryoDRGN of training images per second (per-epoch time from cryoDRGN's log).

    .venv/bin/python bench/train_throughput.py --D 64 128 --arch 256x3 1024x3 --threads 2 \\
        --cryodrgn /tmp/cryodrgn-venv/bin/cryodrgn

The image count per configuration is chosen so each run takes about --seconds of training on this machine
(from a FLOP estimate); override it with --images. cryoDRGN's input pose/CTF files are made by cryoDRGN's
own parse_pose_star / parse_ctf_star from the RELION STAR file our simulator writes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The child process reports its own peak RSS (ru_maxrss of its only child): exact per run.
MAXRSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
          "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
          "sys.exit(r.returncode)")


def run_measured(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """Run cmd; return (wall seconds, peak RSS MiB). Output goes to `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-c", MAXRSS, *cmd], env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({r.returncode}); see {log}:\n{text[-2000:]}")
    m = re.findall(r"MAXRSS_KIB (\d+)", text)
    return wall, (int(m[-1]) / 1024 if m else float("nan"))


def estimate_flops_per_image(D: int, width: int, layers: int) -> float:
    """Forward+backward FLOPs of one image: decoder on ~πD²/8 points, plus the encoder on ~πD²/4 inputs."""
    P = np.pi * D * D / 8
    dec = 2 * P * (3 * D * width + layers * width * width + 2 * width)
    enc = 2 * (2 * P * width + layers * width * width)
    return 3 * (dec + enc)


def simulate(outdir: Path, n: int, D: int, seed: int) -> Path:
    from drgn_core.simulate import SimConfig, run_simulation

    if not (outdir / "table.star").exists():
        run_simulation(SimConfig(n=n, D=D, apix=3.0 * 128 / D, snr=0.1, heterogeneity="none", seed=seed),
                       outdir, progress=False)
    return outdir


def drgn_command() -> list[str]:
    """The installed `drgn` script, or the package run as a module where drgnflow is only on PYTHONPATH
    (bench/gpu_check.sh on a machine without network access, dependencies from carried wheels)."""
    exe = Path(sys.executable).parent / "drgn"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "drgn_core.cli"]


def drgn_run(data: Path, out: Path, width: int, layers: int, epochs: int, threads: int, device: str,
             precision: str, batch: int, env: dict) -> dict:
    cmd = [*drgn_command(), "train", str(data / "table.star"),
           str(data / "particles.mrcs"), "-o", str(out), "--zdim", "8", "--enc-dim", str(width),
           "--enc-layers", str(layers), "--dec-dim", str(width), "--dec-layers", str(layers),
           "--epochs", str(epochs), "--batch-size", str(batch), "--lr", "1e-4", "--val-frac", "0",
           "--threads", str(threads), "--device", device, "--precision", precision]
    wall, rss = run_measured(cmd, env, out.with_suffix(".log"))
    log = np.genfromtxt(out / "train_log.csv", delimiter=",", names=True, ndmin=1)
    return {"images_per_s": float(log["images_per_s"][-1]),
            "epoch_seconds": [float(s) for s in log["seconds"]],
            "peak_mem_MiB": float(log["peak_mem_MiB"][-1]) if device == "cuda" else rss, "wall_s": wall}


def cryodrgn_run(exe: str, data: Path, out: Path, D: int, apix: float, n: int, width: int, layers: int,
                 epochs: int, batch: int, env: dict) -> dict:
    poses, ctf = out.parent / f"{out.name}.pose.pkl", out.parent / f"{out.name}.ctf.pkl"
    star = data / "particles.star"
    subprocess.run([exe, "parse_pose_star", str(star), "-o", str(poses), "-D", str(D)], env=env, check=True,
                   capture_output=True)
    subprocess.run([exe, "parse_ctf_star", str(star), "-o", str(ctf), "-D", str(D), "--Apix", str(apix)],
                   env=env, check=True, capture_output=True)
    cmd = [exe, "train_vae", str(data / "particles.mrcs"), "--poses", str(poses), "--ctf", str(ctf),
           "--zdim", "8", "-n", str(epochs), "-o", str(out), "--enc-dim", str(width),
           "--enc-layers", str(layers), "--dec-dim", str(width), "--dec-layers", str(layers),
           "-b", str(batch),
           "--lr", "1e-4", "--pe-type", "gaussian", "--domain", "fourier", "--uninvert-data", "--no-analysis"]
    wall, rss = run_measured(cmd, env, out.with_suffix(".log"))
    text = out.with_suffix(".log").read_text()
    times = [_seconds(t) for t in re.findall(r"=====> Epoch: \d+ .*?Finished in (\S+)", text)]
    if not times:
        raise RuntimeError(f"no epoch times found in {out.with_suffix('.log')}")
    return {"images_per_s": n / times[-1], "epoch_seconds": times, "peak_mem_MiB": rss, "wall_s": wall}


def _seconds(hms: str) -> float:
    h, m, s = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--D", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--arch", nargs="+", default=["256x3", "1024x3"], help="WIDTHxLAYERS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is reported")
    ap.add_argument("--batch-size", type=int, default=8, help="images per batch, both programs (paper: 8)")
    ap.add_argument("--images", type=int, default=0, help="images per run (default: from --seconds)")
    ap.add_argument("--seconds", type=float, default=40.0, help="target training seconds per epoch")
    ap.add_argument("--gflops", type=float, default=60.0, help="assumed speed for choosing --images")
    ap.add_argument("--max-images", type=int, default=5000, help="cap on the chosen image count")
    ap.add_argument("--cryodrgn", help="cryodrgn executable (default: `cryodrgn` on PATH, if any)")
    ap.add_argument("--workdir", help="keep data and runs here (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    exe = args.cryodrgn or shutil.which("cryodrgn")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="drgn-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    results = []
    for D in args.D:
        for arch in args.arch:
            width, layers = (int(x) for x in arch.lower().split("x"))
            n = args.images or int(np.clip(args.seconds * args.gflops * 1e9
                                           / estimate_flops_per_image(D, width, layers), 16, args.max_images))
            n = max(16, n // 8 * 8)
            data = simulate(work / f"data_D{D}_n{n}", n, D, args.seed)
            apix = 3.0 * 128 / D
            entry = {"D": D, "arch": arch, "images": n, "epochs": args.epochs, "threads": args.threads,
                     "device": args.device, "batch_size": args.batch_size}
            for prec in args.precision:
                out = work / f"drgn_D{D}_{arch}_{prec}"
                shutil.rmtree(out, ignore_errors=True)
                entry[f"drgnflow_{prec}"] = drgn_run(data, out, width, layers, args.epochs, args.threads,
                                                     args.device, prec, args.batch_size, env)
            if exe:
                out = work / f"cryodrgn_D{D}_{arch}"
                shutil.rmtree(out, ignore_errors=True)
                try:
                    entry["cryodrgn"] = cryodrgn_run(exe, data, out, D, apix, n, width, layers, args.epochs,
                                                     args.batch_size, env)
                    for prec in args.precision:
                        entry[f"ratio_{prec}"] = (entry[f"drgnflow_{prec}"]["images_per_s"]
                                                  / entry["cryodrgn"]["images_per_s"])
                except (RuntimeError, subprocess.CalledProcessError) as e:
                    entry["cryodrgn_error"] = str(e)[:500]
            else:
                entry["cryodrgn"] = None
            results.append(entry)
            print(json.dumps(entry), flush=True)
    print(json.dumps({"machine": {"cpu_count": os.cpu_count(), "threads": args.threads},
                      "cryodrgn": exe, "results": results}, indent=1))


if __name__ == "__main__":
    main()
