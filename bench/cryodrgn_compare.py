"""drgnflow against cryoDRGN 4.3.1 on the same particles, in the same run, as JSON.

Both programs train side by side, at the same time, one thread each, so that whatever else loads the
machine slows both alike. The data is a simulated closed→open hinge from drgnflow's simulator (continuous,
uniform, D 64, SNR 0.1 by default), written once as particles.mrcs + particles.star; cryoDRGN's own
`parse_pose_star` / `parse_ctf_star` make its poses.pkl and ctf.pkl from that STAR file (as
bench/train_throughput.py does), so neither program reads the other's conversion of the data.

Settings.
- cryoDRGN: `cryodrgn train_vae --zdim Z` at the paper's settings, which are not all 4.3.1's defaults:
  256×3 encoder and decoder, batch 8 (4.3.1's defaults are 1024×3 and batch 16), lr 1e-4, Gaussian
  positional encoding, Fourier decoder; --uninvert-data because the simulator writes particles white on
  black; every particle trained on; a latent every epoch (its default --checkpoint 1).
- drgnflow: the README's command, `drgn train --zdim Z --val-frac 0` with every other option at its
  default (the paper's architecture, batch and lr; bf16 where the CPU has it), plus --encode-every 1 for a
  latent every epoch, plus --extra (lever flags to compare, e.g. "--lr-schedule cosine").

Measured, per epoch and program: |Spearman ρ| of that epoch's latent against the ground-truth coordinate
(docs/architecture.md § Metrics on simulated data), the wall seconds since the program started and its
CPU seconds (utime + stime from /proc, the process and its children), both read when the epoch's latent
file appears (polled every 0.2 s); --minutes stops both after that long. Then: cryoDRGN's final |ρ| as
the target, the time each takes to reach it (its first epoch at or above it), and the |ρ| of each at
equal time (at the other's epoch ends: the last epoch each had finished by then).

    .venv/bin/python bench/cryodrgn_compare.py --cryodrgn .venv-cryodrgn/bin/cryodrgn --n 3000 \\
        --epochs 10 --workdir /tmp/compare

cryoDRGN is an optional benchmark peer, installed apart (docs/usage.md); drgn_core never imports it. Its
z.E.pkl latents are read through drgn_core's restricted unpickler (drgn_core/io/pickles.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime + the waited-for children's, of a running process (Linux /proc); at its end the
    same comes from wait4's resource usage."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICKS


def read_cryodrgn_z(path: Path) -> np.ndarray:
    """The latent means in cryoDRGN's z.E.pkl (z_mu then z_logvar, two pickles) via the restricted
    unpickler: plain numeric arrays only."""
    from drgn_core.io.pickles import RestrictedUnpickler

    return np.asarray(RestrictedUnpickler(io.BytesIO(path.read_bytes())).load())


class Job:
    """One training program, started now; `poll` notes each epoch's latent file as it appears."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path, latent):
        self.name, self.cmd, self.latent = name, cmd, latent
        self.t0 = time.perf_counter()
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.epochs: dict[int, dict] = {}
        self.total: dict = {}
        self.stopped = False  # terminated at --minutes

    def poll(self, epochs: int) -> None:
        for e in range(1, epochs + 1):
            if e not in self.epochs and self.latent(e).exists():
                self.epochs[e] = {"epoch": e, "wall_s": round(time.perf_counter() - self.t0, 1),
                                  "cpu_s": round(cpu_seconds(self.proc.pid), 1)}

    def done(self, epochs: int) -> bool:
        """Whether the program has ended; then its totals are recorded (CPU time from wait4: exact)."""
        if self.total:
            return True
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.proc.returncode = rc = os.waitstatus_to_exitcode(status)
        self.total = {"returncode": rc, "wall_s": round(time.perf_counter() - self.t0, 1),
                      "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}
        self.log.close()
        self.poll(epochs)
        if rc != 0 and not self.stopped:
            raise RuntimeError(f"{self.name} failed ({rc}); see {self.log.name}")
        return True


def simulate(work: Path, n: int, D: int, apix: float, snr: float, seed: int,
             heterogeneity: str = "continuous") -> Path:
    """The shared data set, simulated once per setting: a uniform hinge (continuous) or one structure
    (none, for bench/cryodrgn_abinit_compare.py)."""
    from drgn_core.simulate import SimConfig, run_simulation

    kind = {"continuous": "hinge", "none": "homo"}[heterogeneity]
    data = work / f"{kind}_D{D}_n{n}_apix{apix:g}_snr{snr:g}_s{seed}"
    if not (data / "table.star").exists():
        run_simulation(SimConfig(n=n, D=D, apix=apix, snr=snr, heterogeneity=heterogeneity,
                                 distribution="uniform", seed=seed), data, progress=False)
    return data


def add_data_arguments(ap: argparse.ArgumentParser, n: int, epochs: int, epochs_help: str) -> None:
    """The options both side-by-side benches share: the peer, the simulated set, the work folder."""
    ap.add_argument("--cryodrgn", default=shutil.which("cryodrgn"), help="the cryodrgn executable")
    ap.add_argument("--n", type=int, default=n, help=f"particles (default {n})")
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--apix", type=float, default=3.0, help="Å/px (default 3, as bench/train_accuracy.py)")
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    ap.add_argument("--seed", type=int, default=0, help="the data's seed")
    ap.add_argument("--workdir", type=Path, required=True)


def prepared(a: argparse.Namespace, heterogeneity: str) -> Path:
    """Refuse without cryoDRGN, then the simulated set in a.workdir."""
    if not a.cryodrgn:
        sys.exit("cryodrgn not found: give --cryodrgn PATH (install cryodrgn==4.3.1 in its own venv)")
    a.workdir.mkdir(parents=True, exist_ok=True)
    return simulate(a.workdir, a.n, a.D, a.apix, a.snr, a.seed, heterogeneity)


def run_side_by_side(jobs: list[Job], marks: dict[str, int], minutes: float, every: float = 0.2
                     ) -> tuple[float | None, tuple, tuple]:
    """Poll the jobs until all end, terminating those still running after `minutes` (0: no limit);
    returns (the second they were stopped or None, load average at start, at end)."""
    load0 = os.getloadavg()
    stopped_at = None
    while not all([j.done(marks[j.name]) for j in jobs]):
        for j in jobs:
            j.poll(marks[j.name])
        if minutes and stopped_at is None and time.perf_counter() - jobs[0].t0 > minutes * 60:
            stopped_at = round(time.perf_counter() - jobs[0].t0, 1)
            for j in jobs:
                if j.proc.returncode is None:
                    j.proc.terminate()  # its returncode is then -15: recorded, not an error
                    j.stopped = True
        time.sleep(every)
    return stopped_at, load0, os.getloadavg()


def rho(z: np.ndarray, coord: np.ndarray) -> float:
    from drgn_core.evaluate import spearman_metric

    return round(float(spearman_metric(z.reshape(len(coord), -1), coord)["value"]), 4)


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next(({"epoch": r["epoch"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"]}
                 for r in curve if r["rho"] >= target), None)


def rho_at(curve: list[dict], wall: float) -> float | None:
    """|ρ| of the last epoch finished by `wall` seconds (None before the first)."""
    done = [r["rho"] for r in curve if r["wall_s"] <= wall]
    return done[-1] if done else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(ap, 3000, 10, "epochs of each program (default 10)")
    ap.add_argument("--zdim", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=0,
                    help="stop both programs after this many minutes and compare the epochs they finished "
                         "(0: no limit); the target is then cryoDRGN's last finished epoch's |ρ|")
    ap.add_argument("--extra", default="", help="more drgn train flags (levers), e.g. '--lr-schedule cosine'")
    a = ap.parse_args()
    from drgn_core.io.table import read_table

    data = prepared(a, "continuous")
    coord = read_table(data / "table.star").particles["drgnGtCoord"].to_numpy(np.float64)
    tag = "drgnflow" + ("_" + "".join(c for c in a.extra if c.isalnum())[:40] if a.extra else "")
    out_d, out_c = a.workdir / tag, a.workdir / "cryodrgn"
    for d in (out_d, out_c):
        shutil.rmtree(d, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    poses, ctf = a.workdir / "poses.pkl", a.workdir / "ctf.pkl"
    star = data / "particles.star"
    subprocess.run([a.cryodrgn, "parse_pose_star", str(star), "-o", str(poses), "-D", str(a.D)], env=env,
                   check=True, capture_output=True)
    subprocess.run([a.cryodrgn, "parse_ctf_star", str(star), "-o", str(ctf), "-D", str(a.D), "--Apix",
                    str(a.apix)], env=env, check=True, capture_output=True)

    drgn = Path(sys.executable).parent / "drgn"
    cmd_d = [str(drgn), "train", str(data / "table.star"), str(data / "particles.mrcs"), "-o", str(out_d),
             "--zdim", str(a.zdim), "--epochs", str(a.epochs), "--val-frac", "0", "--threads", "1",
             "--encode-every", "1", *shlex.split(a.extra)]
    cmd_c = [a.cryodrgn, "train_vae", str(data / "particles.mrcs"), "--poses", str(poses), "--ctf", str(ctf),
             "--zdim", str(a.zdim), "-n", str(a.epochs), "-o", str(out_c), "--enc-dim", "256", "--enc-layers",
             "3", "--dec-dim", "256", "--dec-layers", "3", "-b", "8", "--lr", "1e-4", "--pe-type", "gaussian",
             "--domain", "fourier", "--uninvert-data", "--max-threads", "1", "--no-analysis"]

    def z_d(e: int) -> Path:
        return out_d / ("z.npy" if e == a.epochs else f"checkpoints/z.{e:03d}.npy")

    jobs = [Job("drgnflow", cmd_d, env, a.workdir / f"{tag}.log", z_d),
            Job("cryodrgn", cmd_c, env, a.workdir / "cryodrgn.log", lambda e: out_c / f"z.{e}.pkl")]
    stopped_at, load0, load1 = run_side_by_side(jobs, {j.name: a.epochs for j in jobs}, a.minutes)

    curves = {}
    for j in jobs:
        rows = []
        for e in sorted(j.epochs):
            try:
                z = np.load(z_d(e)) if j.name == "drgnflow" else read_cryodrgn_z(out_c / f"z.{e}.pkl")
            except Exception as err:  # a file cut short by --minutes
                print(f"{j.name} epoch {e}: unreadable latent ({err}); left out", file=sys.stderr)
                continue
            rows.append({**j.epochs[e], "rho": rho(z, coord)})
        curves[j.name] = rows
    target = curves["cryodrgn"][-1]["rho"]
    reach = {k: first_reaching(v, target) for k, v in curves.items()}
    equal_time = {
        f"at_{k}_epoch_ends": [{"wall_s": r["wall_s"], "drgnflow": rho_at(curves["drgnflow"], r["wall_s"]),
                                "cryodrgn": rho_at(curves["cryodrgn"], r["wall_s"])} for r in v]
        for k, v in curves.items()}
    ratio = None
    if reach["drgnflow"] and reach["cryodrgn"]:
        ratio = {u: round(reach["drgnflow"][u] / reach["cryodrgn"][u], 3) for u in ("wall_s", "cpu_s")}
    print(json.dumps({
        "data": {"path": str(data), "n": a.n, "D": a.D, "apix": a.apix, "snr": a.snr, "zdim": a.zdim,
                 "epochs": a.epochs},
        "commands": {j.name: " ".join(j.cmd) for j in jobs},
        "load_average_start_end": [round(load0[0], 2), round(load1[0], 2)], "cpu_count": os.cpu_count(),
        "stopped_at_s": stopped_at,
        "totals": {j.name: j.total for j in jobs}, "per_epoch": curves,
        "target_rho": target, "time_to_target": reach, "drgnflow_over_cryodrgn_time_to_target": ratio,
        "rho_at_equal_time": equal_time}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
