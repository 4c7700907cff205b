"""Benchmark: `drgn fetch` against a loopback server throttled like EBI (1.5 MB/s per connection).

Two figures, each against an issue-13 target:
- the speed-up of 8 parallel Range connections over one, on one file (target ≥ 6×);
- the cost of resuming a file killed (SIGKILL) at 90 % against a full fetch of it, in wall time and
  bytes (target ≤ 15 %).
The server is tests/empiar_server.py in a process of its own (127.0.0.1, ephemeral port; it stops when
this script closes its stdin). The full fetches run in-process (`fetch_files`), so Python start-up is not
timed; the killed fetch runs as `drgn fetch` in a subprocess, killed once its progress index shows 90 %.
Prints JSON. About 25 s of wall time with the defaults.

Run: .venv/bin/python bench/fetch_parallel.py [--mb 24] [--rate 1.5e6] [--chunk-mb 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tqdm  # noqa: F401  (imported here so its import is not timed inside fetch_files)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drgn_core.fetch.download import (  # noqa: E402
    IDX_HEADER,
    FetchOptions,
    RemoteFile,
    chunk_for,
    fetch_files,
)


def timed_fetch(url: str, out: Path, connections: int, chunk: int) -> float:
    opts = FetchOptions(connections=connections, chunk_size=chunk, progress=False, backoff=0.05)
    t0 = time.perf_counter()
    fetch_files([RemoteFile("data/big.bin", url)], out, opts)
    return time.perf_counter() - t0


def bytes_on_disk(idx: Path) -> int:
    """Bytes a killed or running fetch has on disk, from its progress index."""
    try:
        raw = idx.read_bytes()[IDX_HEADER:]
    except FileNotFoundError:
        return 0
    return sum(struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=24.0, help="file size in MB (default 24)")
    ap.add_argument("--rate", type=float, default=1.5e6, help="bytes/s per connection (default 1.5e6)")
    ap.add_argument("--chunk-mb", type=float, default=8.0,
                    help="largest Range request in MiB (default 8, drgn fetch's; a 24 MB file is cut into "
                    "256 KiB requests, 16 per connection: see download.chunk_for)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    size = int(a.mb * 1e6)
    chunk = int(a.chunk_mb * (1 << 20))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "srv" / "10999" / "data").mkdir(parents=True)
        (tmp / "srv" / "10999" / "data" / "big.bin").write_bytes(np.random.default_rng(a.seed).bytes(size))
        server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "empiar_server.py"), str(tmp / "srv"),
                                   str(a.rate)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            url = f"http://127.0.0.1:{port}/data/10999/data/big.bin"
            t1 = timed_fetch(url, tmp / "one", 1, chunk)
            t8 = timed_fetch(url, tmp / "eight", 8, chunk)
            out = tmp / "resume"
            cmd = [sys.executable, "-m", "drgn_core.cli", "fetch", url, "--checksum",
                   "sha256:" + json.loads((tmp / "eight" / "drgn-fetch-manifest.json").read_text())
                   ["files"]["data/big.bin"]["sha256"], "--name", "big.bin", "-o", str(out / "data"),
                   "--quiet", "--chunk-size", str(chunk), "--connections", "8"]
            idx = out / "data" / ".big.bin.part.idx"
            proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while bytes_on_disk(idx) < 0.9 * size and proc.poll() is None:
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            have = bytes_on_disk(idx)
            # Resume with the same layout the killed run used (the index records URL, size and chunking).
            opts = FetchOptions(connections=8, chunk_size=chunk, progress=False, backoff=0.05)
            t0 = time.perf_counter()
            fetch_files([RemoteFile("big.bin", url)], out / "data", opts)
            tr = time.perf_counter() - t0
            identical = ((out / "data" / "big.bin").read_bytes()
                         == (tmp / "eight" / "data" / "big.bin").read_bytes())
        finally:
            server.stdin.close()
            server.wait(timeout=30)
    print(json.dumps({
        "file_bytes": size, "rate_per_connection": a.rate, "max_chunk_bytes": chunk,
        "chunk_bytes_8_connections": chunk_for(size, chunk, 8),
        "one_connection_s": round(t1, 2), "eight_connections_s": round(t8, 2),
        "speedup_8_vs_1": round(t1 / t8, 2), "speedup_target": 6.0,
        "on_disk_when_killed": have, "resume_s": round(tr, 2), "resume_bytes": size - have,
        "resume_time_fraction": round(tr / t8, 3), "resume_bytes_fraction": round((size - have) / size, 3),
        "resume_target": 0.15, "resumed_identical": identical,
    }, indent=1))


if __name__ == "__main__":
    main()
