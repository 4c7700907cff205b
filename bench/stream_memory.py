"""Training on a stack larger than memory: one epoch streamed from disk under a memory limit, against the
same epoch with the prepared stack held in memory, as JSON.

    .venv/bin/python bench/stream_memory.py --D 64 --base 200 --repeat 420 --out /tmp/drgn-stream

The network is small (width 16, one hidden layer, 8 encoding frequencies) so that an epoch over a
gigabyte takes minutes on one CPU thread: the data path, not the model, is what is measured. It renders
`--base` particles (tests/conftest_train.py's closed-form renderer) and repeats them
`--repeat` times into one stack (content does not matter for time and memory), then runs `drgn train`
for `--epochs` epochs in subprocesses, once per `--modes` entry:
- stream: `--data-mode stream` with the prepared-image cache (the default: built in one pass before the
  first epoch, in the run folder), inside a cgroup (v1 or v2, created under /sys/fs/cgroup when this
  process may) whose memory limit is `--limit-frac` of the stack's size (default 0.5: the stack is at
  least twice what the process may hold). Where no cgroup can be made, the limit is not enforced and the
  JSON says so; the peak RSS is measured either way;
- stream-uncached: the same with `--stream-cache off` (every epoch reads and prepares the stack again),
  under the same limit;
- memory: `--data-mode memory`, no limit.
Reported: the stack's size, the limit and whether it was enforced, each run's epoch times (train_log.csv
`seconds`: the training loop, not the preparation or the cache's build, which is reported apart),
images/s, peak RSS of the process (ru_maxrss), and the stream/memory ratio of the mean epoch time
(target <= 1.2) and stack/peak-RSS ratio (target >= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MAXRSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
          "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
          "sys.exit(r.returncode)")


def make_stack(out: Path, D: int, base: int, repeat: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest_train import render

    from drgn_core.io.mrc import read_mrc, write_mrc
    from drgn_core.io.table import read_table, write_table

    stack, table = out / "particles.mrcs", out / "table.star"
    if stack.exists() and table.exists():
        return table, stack
    d = render(out / "base", n=base, D=D, kind="continuous", snr=1.0, apix=4.0 * 64 / D, seed=1)
    images, apix = read_mrc(d.stack, mmap=False)
    write_mrc(stack, np.tile(images, (repeat, 1, 1)), apix, stack=True)
    write_table(read_table(d.table).subset(np.tile(np.arange(base), repeat)), table)
    return table, stack


def make_cgroup(limit: int) -> tuple[Path | None, str]:
    """A fresh memory cgroup limited to `limit` bytes: (its folder, 'v1' | 'v2'), or (None, reason)."""
    name = f"drgn-bench-{os.getpid()}"
    for root, version, knob in ((Path("/sys/fs/cgroup/memory"), "v1", "memory.limit_in_bytes"),
                                (Path("/sys/fs/cgroup"), "v2", "memory.max")):
        if version == "v2" and not (root / "cgroup.controllers").exists():
            continue
        if not root.is_dir():
            continue
        try:
            cg = root / name
            cg.mkdir()
            (cg / knob).write_text(str(limit))
            if version == "v1":
                try:  # no swap either, where the kernel accounts it
                    (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
                except OSError:
                    pass
            return cg, version
        except OSError as e:
            reason = f"{root}: {e}"
    return None, locals().get("reason", "no cgroup memory controller found")


def run_epoch(table: Path, stack: Path, run: Path, mode: str, args, cgroup: Path | None) -> dict:
    cmd = [sys.executable, "-m", "drgn_core.cli", "train", str(table), str(stack), "-o", str(run),
           "--epochs", "1", "--val-frac", "0", "--zdim", "1", "--enc-dim", str(args.width), "--enc-layers",
           "1", "--dec-dim", str(args.width), "--dec-layers", "1", "--batch-size", str(args.batch),
           "--pe-dim", str(args.pe_dim),
           "--threads", str(args.threads), "--precision", "fp32", "--device", "cpu", "--data-mode", mode,
           "--chunk", str(args.chunk), "--mix-chunks", str(args.mix)]
    cmd[cmd.index("--epochs") + 1] = str(args.epochs)
    if mode == "stream-uncached":
        cmd[cmd.index("--data-mode") + 1] = "stream"
        cmd += ["--stream-cache", "off"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}

    def enter() -> None:  # the child joins the cgroup before it execs
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    t0 = time.perf_counter()
    log = run.with_suffix(".log")
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-c", MAXRSS, *cmd], env=env, stdout=f, stderr=subprocess.STDOUT,
                           preexec_fn=enter)
    wall = time.perf_counter() - t0
    text = log.read_text()
    res = {"mode": mode, "rc": r.returncode, "wall_s": round(wall, 1)}
    m = re.findall(r"MAXRSS_KIB (\d+)", text)
    res["peak_rss_MiB"] = round(int(m[-1]) / 1024, 1) if m else None
    if r.returncode != 0:
        res["error"] = text[-1500:]
        return res
    rows = np.atleast_1d(np.genfromtxt(run / "train_log.csv", delimiter=",", names=True))
    res["epoch_s"] = round(float(rows["seconds"].mean()), 2)
    res["epochs_s"] = [round(float(x), 2) for x in rows["seconds"]]
    res["images_per_s"] = round(float(rows["images_per_s"].mean()), 1)
    res["loss"] = [round(float(x), 6) for x in rows["loss"]]
    built = re.search(r"cache of ([\d.]+) GiB written to .* in ([\d.]+) s", text)
    if built:
        res["cache_GiB"], res["cache_build_s"] = float(built.group(1)), float(built.group(2))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--base", type=int, default=200, help="particles rendered")
    ap.add_argument("--repeat", type=int, default=420, help="times they are repeated in the stack")
    ap.add_argument("--width", type=int, default=16, help="encoder/decoder width (one hidden layer each)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--pe-dim", type=int, default=8, help="positional-encoding frequencies (small: cheap)")
    ap.add_argument("--chunk", type=int, default=0, help="0: drgn train's default (16 MiB prepared)")
    ap.add_argument("--mix", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--modes", default="stream,memory",
                    help="comma-separated runs: stream (with the cache), stream-uncached, memory")
    ap.add_argument("--limit-frac", type=float, default=0.5, help="memory limit / stack size")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="drgn-stream-"))
    out.mkdir(parents=True, exist_ok=True)
    table, stack = make_stack(out, args.D, args.base, args.repeat)
    size = stack.stat().st_size
    limit = int(args.limit_frac * size)
    cg, how = make_cgroup(limit)
    result = {"D": args.D, "images": args.base * args.repeat, "stack_MiB": round(size / 2**20, 1),
              "limit_MiB": round(limit / 2**20, 1), "limit_enforced_by": f"cgroup {how}" if cg else None,
              "cgroup_error": None if cg else how, "chunk": args.chunk, "mix": args.mix,
              "threads": args.threads, "width": args.width, "batch": args.batch, "pe_dim": args.pe_dim,
              "epochs": args.epochs}
    try:
        for name in args.modes.split(","):
            run = out / f"run_{name}"
            if run.exists():
                import shutil

                shutil.rmtree(run)
            limited = cg if name != "memory" else None
            if limited is not None and (cg / "memory.max_usage_in_bytes").exists():
                (cg / "memory.max_usage_in_bytes").write_text("0")  # v1: reset the peak for this run
            result[name] = run_epoch(table, stack, run, name, args, limited)
            if limited is not None and (cg / "memory.max_usage_in_bytes").exists():
                result[name]["cgroup_peak_MiB"] = round(int((cg / "memory.max_usage_in_bytes").read_text())
                                                        / 2**20, 1)
            elif limited is not None and (cg / "memory.peak").exists():
                result[name]["cgroup_peak_MiB"] = round(int((cg / "memory.peak").read_text()) / 2**20, 1)
    finally:
        if cg is not None:
            for _ in range(50):
                try:
                    cg.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
    m = result.get("memory", {})
    for name in ("stream", "stream-uncached"):
        s = result.get(name, {})
        if "epoch_s" in s and "epoch_s" in m:
            result[f"{name}_over_memory_epoch_time"] = round(s["epoch_s"] / m["epoch_s"], 3)
        if s.get("peak_rss_MiB"):
            result[f"stack_over_{name}_peak_rss"] = round(result["stack_MiB"] / s["peak_rss_MiB"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
