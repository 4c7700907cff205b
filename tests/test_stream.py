"""Streaming from disk: chunks shuffled across and within, batches identical to the in-memory ones (for
one process and for each rank of two), memory bounded well below the stack, and training that matches
in-memory training.

Memory is measured as this process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above
what it held before the epoch, so the test does not depend on how much torch itself occupies.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_train import render

from drgn_core.cli import main
from drgn_core.data import ParticleData, open_particles
from drgn_core.io.mrc import read_mrc, write_mrc
from drgn_core.io.table import read_table, write_table
from drgn_core.models import HalfLattice

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return render(tmp_path_factory.mktemp("tiny"), n=240, D=16, kind="continuous", snr=1.0, apix=8.0, seed=3)


def test_mixed_chunks_give_the_in_memory_batches_on_every_rank(tiny):
    table = read_table(tiny.table)
    src = open_particles(tiny.stack, table)
    rows = np.arange(1, 240, 2)  # 120 rows: chunks of 20 → 6 chunks, mixed 2 by 2 → 3 groups
    lat = HalfLattice(16)
    mem = ParticleData(src, table, rows, lat, 5.0, CPU, mode="memory", progress=False)
    st = ParticleData(src, table, rows, lat, 5.0, CPU, mode="stream", chunk=20, mix=2, progress=False)
    order = st.epoch_order(np.arange(120), seed=2, epoch=1)
    assert sorted(order) == list(range(120))
    groups = [set((order[a:a + 40] // 20).tolist()) for a in range(0, 120, 40)]
    assert [len(g) for g in groups] == [2, 2, 2] and set.union(*groups) == set(range(6))
    # the two chunks of a group are interleaved, not visited one after the other
    assert np.count_nonzero(np.diff(order[:40] // 20)) > 5
    assert [len(s) for s in st._segments(order)] == [40, 40, 40]
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        bm = list(mem.batches(order, 8, start=8, rank=rank, world=world))
        bs = list(st.batches(order, 8, start=8, rank=rank, world=world))
        assert len(bm) == len(bs) == 14
        for a, b in zip(bm, bs):
            assert torch.equal(a.pos, b.pos) and (a.lo, a.n_global) == (b.lo, b.n_global)
            torch.testing.assert_close(a.y, b.y)
            torch.testing.assert_close(a.ctf, b.ctf)
    # the ranks' slices of each global batch put together are the global batch, in order
    whole = [b.pos for b in mem.batches(order, 8, start=8)]
    r0 = [b.pos for b in mem.batches(order, 8, start=8, rank=0, world=2)]
    r1 = [b.pos for b in mem.batches(order, 8, start=8, rank=1, world=2)]
    for w, a, b in zip(whole, r0, r1):
        assert torch.equal(torch.cat([a, b]), w) and len(a) == 4


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _epoch_peak_mib(data: ParticleData) -> float:
    """Peak resident memory (MiB) above the level before one pass over every batch of an epoch."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    seen = 0
    for b in data.batches(data.epoch_order(np.arange(data.n), seed=0, epoch=0), 64):
        seen += len(b.pos)
        assert torch.isfinite(b.y).all()
    assert seen == data.n
    return (_status_kib("VmHWM") - before) / 1024


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 250 MiB stack: 200 rendered 64-px particles, repeated 80 times (table rows repeated alike)."""
    d = render(tmp_path_factory.mktemp("base"), n=200, D=64, kind="continuous", snr=1.0, apix=4.0, seed=1)
    images, apix = read_mrc(d.stack, mmap=False)
    out = tmp_path_factory.mktemp("big")
    write_mrc(out / "particles.mrcs", np.tile(images, (80, 1, 1)), apix, stack=True)
    table = read_table(d.table)
    write_table(table.subset(np.tile(np.arange(200), 80)), out / "table.star")
    return out


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_streaming_memory_stays_far_below_the_stack(big):
    table = read_table(big / "table.star")
    src = open_particles(big / "particles.mrcs", table)
    stack_mib = (big / "particles.mrcs").stat().st_size / 2**20
    assert stack_mib > 240
    lat = HalfLattice(64)
    st = ParticleData(src, table, np.arange(16000), lat, 3.0, CPU, mode="stream", chunk=128, mix=2,
                      progress=False)
    stream_peak = _epoch_peak_mib(st)
    # groups of 2 x 128 images in flight (being prepared, queued, being served), 2 x 1603 float32 each
    # once prepared, with the FFT's temporaries while one is prepared: measured 38 MiB; nothing of the
    # stack stays mapped
    assert stream_peak < stack_mib / 4, (stream_peak, stack_mib)
    # the control: holding the prepared stack takes at least its size
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    mem = ParticleData(src, table, np.arange(16000), lat, 3.0, CPU, mode="memory", progress=False)
    held = (_status_kib("VmHWM") - before) / 1024
    assert held > 0.9 * 16000 * lat.P * 8 / 2**20 > stack_mib / 2, (held, stack_mib)
    del mem


def test_streamed_training_matches_in_memory_training(tiny, tmp_path):
    opts = ["--zdim", "1", "--enc-dim", "32", "--enc-layers", "1", "--dec-dim", "32", "--dec-layers", "1",
            "--threads", "1", "--device", "cpu", "--precision", "fp32", "--epochs", "3", "--lr", "1e-3",
            "--val-frac", "0.1"]
    runs = {}
    for mode in ("memory", "stream"):
        runs[mode] = tmp_path / mode
        assert main(["train", str(tiny.table), str(tiny.stack), "-o", str(runs[mode]), *opts, "--data-mode",
                     mode, "--chunk", "32", "--mix-chunks", "2"]) == 0
    logs = {m: np.genfromtxt(r / "train_log.csv", delimiter=",", names=True) for m, r in runs.items()}
    # different visiting orders, same data: the epoch losses agree to within a few per cent, and both fall
    np.testing.assert_allclose(logs["stream"]["loss"], logs["memory"]["loss"], rtol=0.03)
    np.testing.assert_allclose(logs["stream"]["val_loss"], logs["memory"]["val_loss"], rtol=0.03)
    assert logs["stream"]["loss"][-1] < logs["stream"]["loss"][0]
    # the final latents of a streamed run are encoded in row order like any other
    assert np.load(runs["stream"] / "z.npy").shape == (240, 1)
