"""`drgn fetch` killed (SIGKILL) at 20 seeded random moments and resumed after each, against a loopback
EMPIAR (tests/empiar_server.py) that drops the first request of every stack mid-way, answers 503 above
--connections and throttles each connection so that the kills land mid-transfer.

What must hold whatever the moment of the kill (issue 22): no run ends in a traceback; the final files are
byte-identical to the server's; the server sent at most 1.1 × the entry's bytes in all; and at no moment
did it see more requests at once than --connections (listings, HEADs, API calls and retries included).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from empiar_server import FakeEmpiar, api_body

from drgn_core.io.mrc import write_mrc

ROOT = Path(__file__).resolve().parents[1]
CONNECTIONS = 4
KILLS = 20


def _entry(root: Path, n_stacks: int = 4, n_images: int = 250) -> dict[str, bytes]:
    """EMPIAR-10997: a RELION 3.0 STAR naming four 4 MiB stacks (not listed: they follow from the STAR)."""
    rng = np.random.default_rng(3)
    base = root / "10997" / "data"
    (base / "stacks").mkdir(parents=True)
    rows = []
    for k in range(n_stacks):
        write_mrc(base / "stacks" / f"s{k}.mrcs", rng.standard_normal((n_images, 64, 64)).astype(np.float32),
                  1.31, stack=True)
        rows += [f"{i + 1:06d}@stacks/s{k}.mrcs" for i in range(0, n_images, 50)]
    (base / "Parameters.star").write_text("data_\nloop_\n_rlnImageName #1\n" + "\n".join(rows) + "\n")
    return {str(p.relative_to(root / "10997")): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def test_kill9_at_20_random_moments_then_resume(tmp_path):
    files = _entry(tmp_path / "srv")
    total = sum(len(b) for b in files.values())
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = np.random.default_rng(2022)
    # Kill points: a byte count the server must have sent (spread over the whole entry, so that every run
    # makes some progress and the kills cover the start, the middle and the end of files), checked only
    # after a random delay, so that some kills land during start-up, the API call or the listing.
    thresholds = np.sort(rng.uniform(0.02, 0.98, KILLS)) * total
    delays = rng.uniform(0.0, 0.6, KILLS)
    with FakeEmpiar(tmp_path / "srv", {"EMPIAR-10997": api_body("10997")}, max_connections=CONNECTIONS,
                    rate=5e5, lifetime=300) as srv:
        # What a kill wastes is what is in flight: about (aggregate rate) × (the client's scheduling lag)
        # per kill, plus one write per connection. A slow rate and small writes keep that to a few per
        # cent of a 16 MiB entry, at 8 s of transfer in all: the bound tested is the fetch's, not TCP's.
        srv.block = 4096
        for name in files:
            if name.endswith(".mrcs"):
                srv.drop_once[f"10997/{name}"] = 100_000  # the first large request of each file drops
        cmd = [sys.executable, "-m", "drgn_core.cli", "fetch", "EMPIAR-10997", "-o", str(out), "--api-base",
               srv.api_base, "--data-base", srv.data_base, "--include", "data/Parameters.star", "--stacks-of",
               str(out / "data" / "Parameters.star"), "--connections", str(CONNECTIONS), "--backoff", "0.05",
               "--chunk-size", "1M"]
        outcomes = []
        for k in range(KILLS):
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            t0 = time.monotonic()
            while proc.poll() is None and time.monotonic() - t0 < 60 and (
                    time.monotonic() - t0 < delays[k] or srv.bytes_sent < thresholds[k]):
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
            err = proc.stderr.read().decode()
            outcomes.append(rc)
            assert "Traceback" not in err, err
            assert rc in (0, -signal.SIGKILL) or (rc == 2 and err.count("\n") == 1), (rc, err)
        assert outcomes.count(-signal.SIGKILL) >= KILLS // 2, outcomes  # most kills landed mid-run
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert srv.refused == 0 and srv.peak <= CONNECTIONS, (srv.refused, srv.peak)
        sent = srv.bytes_sent
        per_file = dict(srv.served)
    for name, data in files.items():
        assert (out / name).read_bytes() == data, name
    assert list(out.rglob(".*.part*")) == []
    assert sent <= 1.1 * total, (sent / total, per_file)
    assert all(per_file[f"10997/{n}"] <= 1.1 * len(b) + 65536 for n, b in files.items()), per_file
