"""Benchmark: `drgn fetch` killed (SIGKILL) again and again, then resumed, against one uninterrupted fetch.

The loopback server (tests/empiar_server.py, in this process's threads; the fetches are `drgn fetch`
subprocesses) behaves as the issue-22 report describes EBI: 1.5 MB/s per connection, 503 above 8
connections, and the first large request of each file dropped mid-way. The entry is a STAR naming `--files`
stacks of `--mb` MB; `--include` names only the STAR, the stacks follow from it (`--stacks-of`).

Figures: bytes the server sent over the entry's size (uninterrupted, and in all over the killed runs and the
final resume), wall time of the final resume and of all runs together over the uninterrupted fetch, and the
server's largest number of requests at once. Kills land at seeded random byte counts spread over the entry.
Prints JSON. About a minute of wall time with the defaults.

Run: .venv/bin/python bench/fetch_kills.py [--kills 10] [--files 4] [--mb 8] [--rate 1.5e6] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from empiar_server import FakeEmpiar, api_body  # noqa: E402

from drgn_core.io.mrc import write_mrc  # noqa: E402


def make_entry(root: Path, files: int, mb: float) -> int:
    base = root / "10996" / "data"
    (base / "stacks").mkdir(parents=True)
    n = max(1, int(mb * 1e6 / (64 * 64 * 4)))
    rng = np.random.default_rng(0)
    rows = []
    for k in range(files):
        write_mrc(base / "stacks" / f"s{k}.mrcs", rng.standard_normal((n, 64, 64)).astype(np.float32), 1.3,
                  stack=True)
        rows.append(f"000001@stacks/s{k}.mrcs")
    (base / "Parameters.star").write_text("data_\nloop_\n_rlnImageName #1\n" + "\n".join(rows) + "\n")
    return sum(p.stat().st_size for p in base.rglob("*") if p.is_file())


def fresh_server(root: Path, rate: float) -> FakeEmpiar:
    srv = FakeEmpiar(root, {"EMPIAR-10996": api_body("10996")}, max_connections=8, rate=rate, lifetime=900)
    for p in (root / "10996" / "data" / "stacks").iterdir():
        srv.drop_once[f"10996/data/stacks/{p.name}"] = 500_000
    return srv


def command(srv: FakeEmpiar, out: Path) -> list[str]:
    return [sys.executable, "-m", "drgn_core.cli", "fetch", "EMPIAR-10996", "-o", str(out), "--api-base",
            srv.api_base, "--data-base", srv.data_base, "--include", "data/Parameters.star", "--stacks-of",
            str(out / "data" / "Parameters.star"), "--quiet", "--backoff", "0.2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--mb", type=float, default=8.0)
    ap.add_argument("--rate", type=float, default=1.5e6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="drgn-fetch-kills-") as tmp:
        tmp = Path(tmp)
        total = make_entry(tmp / "srv", a.files, a.mb)
        with fresh_server(tmp / "srv", a.rate) as srv:
            t0 = time.perf_counter()
            subprocess.run(command(srv, tmp / "once"), env=env, check=True, stdout=subprocess.DEVNULL)
            t_once = time.perf_counter() - t0
            once = {"bytes_ratio": srv.bytes_sent / total, "peak_connections": srv.peak,
                    "refused_503": srv.refused}
        rng = np.random.default_rng(a.seed)
        thresholds = np.sort(rng.uniform(0.02, 0.98, a.kills)) * total
        with fresh_server(tmp / "srv", a.rate) as srv:
            out = tmp / "killed"
            t_all = 0.0
            for k in range(a.kills):
                t0 = time.perf_counter()
                proc = subprocess.Popen(command(srv, out), env=env, stdout=subprocess.DEVNULL)
                while proc.poll() is None and srv.bytes_sent < thresholds[k]:
                    time.sleep(0.005)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                proc.wait()
                t_all += time.perf_counter() - t0
            before = srv.bytes_sent
            t0 = time.perf_counter()
            subprocess.run(command(srv, out), env=env, check=True, stdout=subprocess.DEVNULL)
            t_last = time.perf_counter() - t0
            t_all += t_last
            identical = all((out / p.relative_to(tmp / "srv" / "10996")).read_bytes() == p.read_bytes()
                            for p in (tmp / "srv" / "10996").rglob("*") if p.is_file())
            killed = {"kills": a.kills, "bytes_ratio": srv.bytes_sent / total,
                      "final_resume_bytes_ratio": (srv.bytes_sent - before) / total,
                      "peak_connections": srv.peak, "refused_503": srv.refused, "identical": identical}
    print(json.dumps({
        "entry_bytes": total, "rate_per_connection": a.rate, "connections": 8,
        "uninterrupted": {**once, "seconds": round(t_once, 2)},
        "killed_and_resumed": {**killed, "final_resume_seconds": round(t_last, 2),
                               "all_runs_seconds": round(t_all, 2),
                               "all_runs_over_uninterrupted": round(t_all / t_once, 3)},
        "load": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
