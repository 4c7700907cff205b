"""Fewer FLOPs to the same answer? `drgn train`'s levers against the default, in CPU seconds per accuracy.

For a simulated set with ground truth, trains the default and each lever as a separate `drgn train` child
(--threads 1, --encode-every 1: a latent snapshot after every epoch) and records per epoch the accuracy of
that epoch's latent (|Spearman ρ| against the hinge coordinate for the continuous set, ARI of k-means
against the states for the compositional one; drgn_core.evaluate) and the child's CPU seconds so far
(utime + stime from /proc, read when the epoch's snapshot appears). Then, per variant: the final accuracy,
the total CPU seconds, and the CPU seconds to first reach the default's final accuracy − 0.005.

CPU seconds, not wall time, because the machine is shared: another job slows the wall clock of a child
but not its CPU time (to first order: memory bandwidth and caches are shared too, so give `uptime`).
The snapshots' encoding (the encoder over every image, a few % of an epoch) is in every variant's time.

Sets (the CI-size sets of tests/test_train_accuracy.py, made by tests/conftest_train.render):
- continuous: 3,000 images, D 32, hinge, SNR 1, seed 0;
- compositional: 3,000 images, D 32, three states, SNR 0.5, seed 12, fixed phantom;
with the tests' small network (128×2, zdim 1, lr 1e-3, --val-frac 0).

Variants: the built-in ones (--variants, default all), plus one per --extra "<drgn train flags>" (e.g. the
learning-rate schedule of another branch), named by its flags. Prints one JSON object.

    python bench/levers.py --set continuous --epochs 12 --out /tmp/levers
    python bench/levers.py --set compositional --epochs 10 --variants default,pk0.7 \\
        --extra "--curriculum 0.25:3 --pixel-keep 0.7"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--zdim", "1", "--enc-dim", "128", "--enc-layers", "2", "--dec-dim", "128", "--dec-layers", "2",
         "--lr", "1e-3", "--threads", "1", "--val-frac", "0", "--seed", "0", "--device", "cpu"]
VARIANTS = {
    "default": [],
    "cur0.25x3": ["--curriculum", "0.25:3"],
    "cur0.25x5": ["--curriculum", "0.25:5"],
    "cur0.25x2-0.375x2": ["--curriculum", "0.25:2,0.375:2"],
    "pk0.7": ["--pixel-keep", "0.7"],
    "pk0.5": ["--pixel-keep", "0.5"],
    "cur0.25x3+pk0.7": ["--curriculum", "0.25:3", "--pixel-keep", "0.7"],
    "pk0.7snr": ["--pixel-keep", "0.7", "--pixel-by", "snr"],
    "pk0.5snr": ["--pixel-keep", "0.5", "--pixel-by", "snr"],
}
TICK = os.sysconf("SC_CLK_TCK")


def make_set(kind: str, folder: Path, n: int = 3000):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest_train import render

    if kind == "cost64":
        return render(folder, n=n, D=64, kind="continuous", snr=0.1, apix=5.0, seed=0)
    if kind == "continuous":
        return render(folder, n=3000, D=32, kind="continuous", snr=1.0, apix=5.0, seed=0)
    return render(folder, n=3000, D=32, kind="compositional", snr=0.5, apix=5.0, seed=12, phantom="fixed")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (all its threads), from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def train_timed(table: Path, stack: Path, run: Path, epochs: int, flags: list[str], base: list[str]
                ) -> dict[int, float]:
    """Run `drgn train` in a child; {epoch: child CPU seconds when that epoch's snapshot appeared}. The
    last epoch's latent is z.npy, written at the end: its time is the child's total (getrusage)."""
    import resource

    cmd = [sys.executable, "-m", "drgn_core.cli", "train", str(table), str(stack), "-o", str(run),
           "--epochs", str(epochs), "--encode-every", "1", *base, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(run.parent / f"{run.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        seen: dict[int, float] = {}
        last = 0.0
        while proc.poll() is None:
            c = cpu_seconds(proc.pid)
            last = c if c is not None else last
            for e in range(1, epochs):
                if e not in seen and (run / "checkpoints" / f"z.{e:03d}.npy").exists():
                    seen[e] = last
            time.sleep(0.05)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"drgn train failed ({proc.returncode}): see {run.parent / (run.name + '.log')}")
    seen[epochs] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return seen


def fresh_run(folder: Path, name: str) -> Path:
    """An empty run directory for a variant (a previous one of the same name removed)."""
    import shutil

    run = folder / ("run_" + "".join(c if c.isalnum() or c in ".:-" else "_" for c in name))
    if run.exists():
        shutil.rmtree(run)
    return run


def accuracy(kind: str, z: np.ndarray, table) -> float:
    from drgn_core.evaluate import cluster_metric, spearman_metric

    if kind == "continuous":
        return spearman_metric(z, table.gt("drgnGtCoord"))["value"]
    return cluster_metric(z, table.gt("drgnGtState"))["ari"]


def evaluate_run(kind: str, run: Path, table, epochs: int) -> dict[int, float]:
    out = {}
    for e in range(1, epochs + 1):
        f = run / "checkpoints" / f"z.{e:03d}.npy"
        f = f if f.exists() else run / "z.npy"
        out[e] = accuracy(kind, np.load(f, allow_pickle=False), table)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=["continuous", "compositional", "cost64"], default="continuous",
                    help="cost64: cost per epoch only, at D 64 with the paper's 256×3 network (--n images, "
                         "SNR 0.1); curriculum variants then train their first 2 epochs inside the radius")
    ap.add_argument("--n", type=int, default=300, help="images of the cost64 set")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("/tmp/drgn_levers"))
    ap.add_argument("--variants", default=",".join(VARIANTS),  # names hold no commas
                    help=f"built-in variants to run, comma-separated ('' for none): {', '.join(VARIANTS)}")
    ap.add_argument("--extra", action="append", default=[],
                    help="another variant: drgn train flags in one string (repeatable)")
    ap.add_argument("--margin", type=float, default=0.005, help="target = the default's final − this")
    a = ap.parse_args()
    from drgn_core.io.table import read_table

    chosen = {k: VARIANTS[k] for k in a.variants.split(",") if k}
    if "default" not in chosen:
        chosen = {"default": [], **chosen}
    for e in a.extra:
        chosen[e.strip()] = shlex.split(e)
    if a.set == "cost64":
        return cost(a, chosen)
    ds = make_set(a.set, a.out / a.set / "data")
    table = read_table(ds.table)
    results = {}
    for name, flags in chosen.items():
        run = fresh_run(a.out / a.set, name)
        t0 = time.perf_counter()
        cpu = train_timed(ds.table, ds.stack, run, a.epochs, flags, SMALL)
        wall = time.perf_counter() - t0
        acc = evaluate_run(a.set, run, table, a.epochs)
        log = np.genfromtxt(run / "train_log.csv", delimiter=",", names=True)
        results[name] = {"flags": " ".join(flags), "wall_s": round(wall, 1),
                         "per_epoch": [{"epoch": e, "metric": round(acc[e], 4), "cpu_s": round(cpu[e], 1),
                                        "epoch_cpu_s": round(cpu[e] - cpu.get(e - 1, 0.0), 1),
                                        "decoder_points": int(log["decoder_points"][e - 1])}
                                       for e in range(1, a.epochs + 1)],
                         "final_metric": round(acc[a.epochs], 4), "cpu_s": round(cpu[a.epochs], 1)}
        print(f"{name}: final {acc[a.epochs]:.4f}, {cpu[a.epochs]:.0f} CPU s", file=sys.stderr)
    target = results["default"]["final_metric"] - a.margin
    for r in results.values():
        hit = next((p for p in r["per_epoch"] if p["metric"] >= target), None)
        r["cpu_s_to_target"] = None if hit is None else hit["cpu_s"]
        r["epoch_to_target"] = None if hit is None else hit["epoch"]
    print(json.dumps({"set": a.set, "metric": "|spearman rho|" if a.set == "continuous" else "ARI",
                      "epochs": a.epochs, "target": round(target, 4), "threads": 1,
                      "load_average": os.getloadavg(), "variants": results}, indent=1))
    return 0


def cost(a: argparse.Namespace, chosen: dict[str, list[str]]) -> int:
    """CPU seconds of one epoch of each variant at D 64 with the paper's network (256×3, zdim 10): the
    difference between consecutive epochs' snapshots, so start-up and data preparation do not count.
    3 epochs; a curriculum of the variant is replaced by its first radius for 2 epochs (epoch 2 is then a
    restricted epoch, epoch 3 a full one)."""
    base = ["--zdim", "10", "--threads", "1", "--val-frac", "0", "--seed", "0", "--device", "cpu"]
    ds = make_set("cost64", a.out / f"cost64_{a.n}" / "data", a.n)
    out = {}
    for name, flags in chosen.items():
        flags = list(flags)
        if "--curriculum" in flags:
            i = flags.index("--curriculum")
            flags[i + 1] = flags[i + 1].split(",")[0].split(":")[0] + ":2"
        run = fresh_run(a.out / f"cost64_{a.n}", name)
        cpu = train_timed(ds.table, ds.stack, run, 3, flags, base)
        log = np.genfromtxt(run / "train_log.csv", delimiter=",", names=True)
        out[name] = {"flags": " ".join(flags), "epoch2_cpu_s": round(cpu[2] - cpu[1], 2),
                     "epoch2_decoder_points": int(log["decoder_points"][1]),
                     "epoch3_cpu_s": round(cpu[3] - cpu[2], 2),
                     "epoch3_decoder_points": int(log["decoder_points"][2])}
        print(f"{name}: epoch 2 {cpu[2] - cpu[1]:.1f} CPU s", file=sys.stderr)
    ref = out["default"]["epoch2_cpu_s"]
    for r in out.values():
        r["epoch2_cost_vs_default"] = round(r["epoch2_cpu_s"] / ref, 3)
    print(json.dumps({"set": "cost64", "D": 64, "n": a.n, "network": "256x3, zdim 10", "threads": 1,
                      "load_average": os.getloadavg(), "variants": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
