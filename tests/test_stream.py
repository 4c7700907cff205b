"""Streaming from disk: chunks shuffled across and within, batches identical to the in-memory ones (for
one process and for each rank of two), memory bounded well below the stack, and training that matches
in-memory training. The prepared-image cache: the same bits as the in-memory mode (float32, and float16 as
on a GPU), rebuilt when the stack or the preparation changes or a part is damaged, reused by a resumed
run (which ends as an uninterrupted one), built by two processes at once, and within the memory bound.

Memory is measured as this process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above
what it held before the epoch, so the test does not depend on how much torch itself occupies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_train import render

import drgn_core.data as data_mod
import drgn_core.io.prepared_cache as cache_mod
from drgn_core.cli import main
from drgn_core.data import ParticleData, open_particles
from drgn_core.io.mrc import read_mrc, write_mrc
from drgn_core.io.stack import file_sha256
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
def test_streaming_memory_stays_far_below_the_stack(big, tmp_path):
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
    # with the prepared-image cache: building it (one sequential pass, 256 images at a time) and an epoch
    # read from it stay within the same bound, although the cache (196 MiB) is nearly the stack's size
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    cached = ParticleData(src, table, np.arange(16000), lat, 3.0, CPU, mode="stream", chunk=128, mix=2,
                          progress=False, cache_dir=tmp_path / "cache", stack_checksum="a stack")
    build_peak = (_status_kib("VmHWM") - before) / 1024
    assert cached.cache is not None and cached.cache.nbytes > 0.75 * stack_mib * 2**20
    cached_peak = _epoch_peak_mib(cached)
    assert max(build_peak, cached_peak) < stack_mib / 4, (build_peak, cached_peak, stack_mib)
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


# ---- the prepared-image cache ------------------------------------------------------------------------------
def _part_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("part_*.npy"))


@pytest.fixture
def small_parts(monkeypatch):
    """Preparation blocks of 32 images and cache parts of 64, so that 240 rows make four parts and
    streamed chunks of 20 straddle part boundaries."""
    monkeypatch.setattr(data_mod, "PREP_BLOCK", 32)
    monkeypatch.setattr(cache_mod, "PART_BYTES", 64 * HalfLattice(16).P * 2 * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cached_stream_serves_the_in_memory_batches_bit_for_bit(tiny, tmp_path, small_parts, monkeypatch,
                                                                dtype):
    """float32 is what the CPU holds and streams; float16 what a GPU holds, forced here on the CPU."""
    if dtype == torch.float16:
        monkeypatch.setattr(ParticleData, "_choose", lambda self, mode: (mode, torch.float16))
        monkeypatch.setattr(cache_mod, "PART_BYTES", cache_mod.PART_BYTES // 2)  # still 64 images
    table = read_table(tiny.table)
    src = open_particles(tiny.stack, table)
    rows = np.arange(240)
    lat = HalfLattice(16)
    mem = ParticleData(src, table, rows, lat, 5.0, CPU, mode="memory", progress=False)
    plain = ParticleData(src, table, rows, lat, 5.0, CPU, mode="stream", chunk=20, mix=2, progress=False)
    st = ParticleData(src, table, rows, lat, 5.0, CPU, mode="stream", chunk=20, mix=2, progress=False,
                      cache_dir=tmp_path / "cache")
    assert mem.y.dtype == dtype and plain.cache is None
    folder = st.cache.folder
    parts = _part_files(folder)
    assert [p.name for p in parts] == [f"part_0000{i}.npy" for i in range(4)]
    # plain .npy files (no pickle) holding exactly the prepared stack the in-memory mode holds
    stored = np.concatenate([np.load(p, allow_pickle=False) for p in parts])
    assert stored.shape == (240, lat.P, 2) and stored.dtype == np.dtype(dtype.__repr__().split(".")[1])
    assert np.array_equal(stored, mem.y.numpy())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stack_sha256"] == file_sha256(tiny.stack) and manifest["parts"] == 4
    assert manifest["key"].startswith(folder.name)
    order = st.epoch_order(np.arange(240), seed=2, epoch=3)
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        bm = list(mem.batches(order, 16, start=16, rank=rank, world=world))
        bs = list(st.batches(order, 16, start=16, rank=rank, world=world))
        bp = list(plain.batches(order, 16, start=16, rank=rank, world=world))
        assert len(bm) == len(bs) == len(bp) == 14
        for a, b, c in zip(bm, bs, bp):
            assert torch.equal(a.pos, b.pos) and torch.equal(a.y, b.y) and torch.equal(a.ctf, b.ctf)
            # without the cache the same images are prepared in other blocks: equal to float32 rounding
            torch.testing.assert_close(c.y, a.y, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 2e-3)


def test_cache_is_rebuilt_for_another_stack_or_preparation_and_for_a_damaged_part(tiny, tmp_path,
                                                                                   small_parts):
    table = read_table(tiny.table)
    images, apix = read_mrc(tiny.stack, mmap=False)
    stack = tmp_path / "particles.mrcs"
    shutil.copy(tiny.stack, stack)
    lat, rows, root = HalfLattice(16), np.arange(240), tmp_path / "cache"

    def cached(norm: float = 5.0, prune: bool = False) -> ParticleData:
        return ParticleData(open_particles(stack, table), table, rows, lat, norm, CPU, mode="stream",
                            chunk=20, progress=False, cache_dir=root, prune=prune)

    def served(d: ParticleData) -> torch.Tensor:
        return torch.cat([b.y for b in d.batches(np.arange(240), 64)])

    first = cached().cache.folder
    mtimes = [p.stat().st_mtime_ns for p in _part_files(first)]
    assert cached().cache.folder == first  # the same data: the same cache, not written again
    assert [p.stat().st_mtime_ns for p in _part_files(first)] == mtimes

    # another normalisation scale: another cache beside the first
    other = cached(norm=4.0).cache.folder
    assert other != first and first.is_dir()

    # the stack's content changes (same size): a new cache, and the batches follow the new images
    write_mrc(stack, images[::-1].copy(), apix, stack=True)
    d = cached(prune=True)
    assert d.cache.folder not in (first, other)
    assert sorted(p.name for p in root.iterdir()) == [d.cache.folder.name]  # the stale ones pruned
    mem = ParticleData(open_particles(stack, table), table, rows, lat, 5.0, CPU, mode="memory",
                       progress=False)
    assert torch.equal(served(d), mem.y)

    # a part cut short (a full disk, a damaged file) is rebuilt, and only that part
    parts = _part_files(d.cache.folder)
    before = [p.stat().st_mtime_ns for p in parts]
    with open(parts[2], "r+b") as f:
        f.truncate(parts[2].stat().st_size - 100)
    again = cached()
    after = [p.stat().st_mtime_ns for p in parts]
    assert [a == b for a, b in zip(before, after)] == [True, True, False, True]
    assert torch.equal(served(again), mem.y)


def test_each_process_builds_its_share_of_the_cache_first(tiny, tmp_path, small_parts, monkeypatch):
    written = []
    real = cache_mod.PreparedCache.write_part
    monkeypatch.setattr(cache_mod.PreparedCache, "write_part",
                        lambda self, i, blocks: (written.append(i), real(self, i, blocks)))
    table = read_table(tiny.table)
    ParticleData(open_particles(tiny.stack, table), table, np.arange(240), HalfLattice(16), 5.0, CPU,
                 mode="stream", chunk=20, progress=False, cache_dir=tmp_path, share=(1, 2))
    assert written == [1, 3, 0, 2]


def test_no_room_for_the_cache_streams_without_it(tiny, tmp_path, monkeypatch, capsys):
    full = shutil._ntuple_diskusage(10**9, 10**9, 1000)
    monkeypatch.setattr(data_mod.shutil, "disk_usage", lambda path: full)
    table = read_table(tiny.table)
    d = ParticleData(open_particles(tiny.stack, table), table, np.arange(240), HalfLattice(16), 5.0, CPU,
                     mode="stream", chunk=20, progress=False, cache_dir=tmp_path / "cache")
    assert d.cache is None and not (tmp_path / "cache").exists()
    err = capsys.readouterr().err
    assert "not enough free disk for the prepared-image cache (0.00 GiB needed, 0.00 GiB free)" in err
    assert sum(len(b.pos) for b in d.batches(np.arange(240), 64)) == 240


TRAIN = ["--zdim", "1", "--enc-dim", "32", "--enc-layers", "1", "--dec-dim", "32", "--dec-layers", "1",
         "--threads", "1", "--device", "cpu", "--precision", "fp32", "--lr", "1e-3", "--val-frac", "0.1",
         "--data-mode", "stream", "--chunk", "32", "--mix-chunks", "2", "--batch-size", "32"]


def test_a_resumed_run_reuses_the_cache_and_ends_as_an_uninterrupted_one(tiny, tmp_path, monkeypatch,
                                                                         capsys):
    import drgn_core.train as train_mod

    args = [str(tiny.table), str(tiny.stack), "--epochs", "3", *TRAIN]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", *args, "-o", str(full)]) == 0
    assert "cache of" in capsys.readouterr().err
    assert not (full / "stream_cache").exists()  # the run's own cache goes when the run is done

    real = train_mod.run_epoch

    def stop_in_epoch_2(*a, **k):
        if a[8].epoch == 1:  # run_epoch's 9th argument is the Progress: stop after epoch 1's checkpoint
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "run_epoch", stop_in_epoch_2)
    assert main(["train", *args, "-o", str(cut)]) == 130
    assert len(_part_files(next((cut / "stream_cache").iterdir()))) == 1  # kept for the resume
    monkeypatch.setattr(train_mod, "run_epoch", real)
    capsys.readouterr()
    assert main(["train", *args, "-o", str(cut), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "reusing the cache" in err and "cache of" not in err
    assert not (cut / "stream_cache").exists()
    assert np.array_equal(np.load(full / "z.npy"), np.load(cut / "z.npy"))
    wa = torch.load(full / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(cut / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_processes_build_one_cache_and_train_as_one(tiny, tmp_path):
    """Two gloo processes build the (one-part) cache at once, each renaming its own copy into place, and
    follow the single-process run step by step."""
    keep = tmp_path / "shared_cache"
    args = [str(tiny.table), str(tiny.stack), "--epochs", "1", *TRAIN, "--log-steps", "--stream-cache",
            str(keep)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-m", "drgn_core.cli", "train", *args, "-o", str(tmp_path / "two"),
                        "--nproc", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (folder,) = keep.iterdir()  # a folder of the user's is kept after the run
    assert [q.name for q in _part_files(folder)] == ["part_00000.npy"]
    assert main(["train", *args, "-o", str(tmp_path / "one")]) == 0
    two = np.genfromtxt(tmp_path / "two" / "train_steps.csv", delimiter=",", names=True)
    one = np.genfromtxt(tmp_path / "one" / "train_steps.csv", delimiter=",", names=True)
    assert len(one) == len(two) == 7
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=0, atol=1e-5)
