"""`drgn train` / `drgn encode` end to end on a tiny synthetic set: run directory contents, bit-exact resume
after SIGKILL, encode and volumes outputs, the data path's modes, and the errors users see."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_train import TINY_TRAIN, render, render_tiny

from drgn_core.cli import main
from drgn_core.data import ParticleData, open_particles
from drgn_core.io.mrc import read_mrc
from drgn_core.io.table import read_table
from drgn_core.models import HalfLattice

TINY = TINY_TRAIN


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return render_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def run1(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run1"
    assert main(["train", str(tiny.table), str(tiny.stack), "-o", str(out), "--epochs", "2", *TINY]) == 0
    return out


def _state(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["state_dict"]


def test_run_directory_contents(run1, tiny):
    for f in ("config.yaml", "model.pt", "z.npy", "z_logvar.npy", "indices.npy", "indices.txt",
              "train_log.csv", "learning_curve.png", "checkpoints/last.pt"):
        assert (run1 / f).exists(), f
    cfg = yaml.safe_load((run1 / "config.yaml").read_text())
    assert cfg["model"]["zdim"] == 1 and cfg["model"]["dec_dim"] == 32 and cfg["model"]["D"] == 16
    tr = cfg["training"]
    assert tr["lr"] == 1e-3 and tr["batch_size"] == 8 and tr["seed"] == 0
    assert cfg["inputs"]["n_train"] == 216 and cfg["inputs"]["n_val"] == 24
    import hashlib

    assert cfg["inputs"]["stack_sha256"] == hashlib.sha256(tiny.stack.read_bytes()).hexdigest()
    assert set(cfg["versions"]) >= {"drgnflow", "torch", "numpy"}
    z, lv, idx = np.load(run1 / "z.npy"), np.load(run1 / "z_logvar.npy"), np.load(run1 / "indices.npy")
    assert z.shape == lv.shape == (240, 1) and z.dtype == np.float32 and np.isfinite(z).all()
    assert np.array_equal(idx, np.arange(240)) and idx.dtype == np.int64
    val = np.load(run1 / "val_indices.npy")
    assert len(val) == 24 and len(np.unique(val)) == 24
    log = np.genfromtxt(run1 / "train_log.csv", delimiter=",", names=True)
    assert list(log["epoch"]) == [1, 2] and (log["val_loss"] > 0).all() and (log["images_per_s"] > 0).all()
    ck = torch.load(run1 / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["step"] == 0 and "optimizer" in ck and "rng" in ck


def test_resume_after_sigkill_gives_identical_weights(tiny, tmp_path, capsys):
    """Kill a real `drgn train` right after its first (mid-epoch) checkpoint, resume it, and compare with
    an uninterrupted run of the same command: every weight must be bit-identical (CPU)."""
    args = [str(tiny.table), str(tiny.stack), "--epochs", "3", *TINY, "--checkpoint-minutes", "0.0002"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", *args, "-o", str(full)]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "drgn_core.cli", "train", *args, "-o", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = cut / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ck.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "model.pt").exists(), "the run finished before it could be killed"
    stopped = torch.load(ck, weights_only=True)
    assert (stopped["epoch"], stopped["step"]) < (3, 0)

    assert main(["train", *args, "-o", str(cut), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().err
    a, b = _state(full), _state(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert np.array_equal(np.load(full / "z.npy"), np.load(cut / "z.npy"))
    la = np.genfromtxt(full / "train_log.csv", delimiter=",", names=True)
    lb = np.genfromtxt(cut / "train_log.csv", delimiter=",", names=True)
    for col in ("epoch", "loss", "mse", "kl", "val_loss"):
        np.testing.assert_array_equal(la[col], lb[col])


def test_resume_refuses_changed_settings_and_allows_more_epochs(run1, tiny, tmp_path, capsys):
    import shutil

    run = tmp_path / "more"
    shutil.copytree(run1, run)
    base = ["train", str(tiny.table), str(tiny.stack), "-o", str(run)]
    assert main([*base, "--resume", "--enc-dim", "64"]) == 2
    assert "cannot resume with different settings: enc_dim = 64 (the run has 32)" in capsys.readouterr().err
    assert main([*base, "--epochs", "3"]) == 2
    assert "already holds a training run; pass --resume" in capsys.readouterr().err
    assert main([*base, "--resume", "--epochs", "3", "--threads", "1"]) == 0
    log = np.genfromtxt(run / "train_log.csv", delimiter=",", names=True)
    assert list(log["epoch"]) == [1, 2, 3]
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["epochs"] == 3
    # a lower learning rate to refine: Adam continues with the new step size, and the log records it
    assert main([*base, "--resume", "--epochs", "4", "--lr", "1e-4"]) == 0
    assert "learning rate 0.001 -> 0.0001 from epoch 4" in capsys.readouterr().err
    log = np.genfromtxt(run / "train_log.csv", delimiter=",", names=True)
    assert list(log["epoch"]) == [1, 2, 3, 4] and log["lr"][-1] == pytest.approx(1e-4)
    assert log["lr"][2] == pytest.approx(1e-3)
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["lr"] == 1e-4


def test_train_on_index_subset(tiny, tmp_path):
    ind = tmp_path / "keep.npy"
    keep = np.array([200, 5, 17, 3, 150, 99, 42, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 19, 20])
    np.save(ind, keep)
    out = tmp_path / "sub"
    assert main(["train", str(tiny.table), str(tiny.stack), "-o", str(out), "--epochs", "1",
                 "--ind", str(ind), *TINY]) == 0
    assert np.array_equal(np.load(out / "indices.npy"), np.sort(keep))
    assert np.load(out / "z.npy").shape == (20, 1)
    assert set(np.load(out / "val_indices.npy")) <= set(keep)


def test_encode_matches_run_latents_in_the_order_asked(run1, tiny, tmp_path):
    out = tmp_path / "z.npy"
    assert main(["encode", str(run1), str(tiny.table), str(tiny.stack), "-o", str(out),
                 "--device", "cpu"]) == 0
    np.testing.assert_allclose(np.load(out), np.load(run1 / "z.npy"), atol=1e-6)
    ind = tmp_path / "rows.txt"
    rows = np.array([9, 3, 3, 200])
    np.savetxt(ind, rows, fmt="%d")
    out2 = tmp_path / "z_rows.npy"
    assert main(["encode", str(run1), str(tiny.table), str(tiny.stack), "-o", str(out2), "--ind", str(ind),
                 "--logvar-out", str(tmp_path / "lv.npy")]) == 0
    np.testing.assert_allclose(np.load(out2), np.load(run1 / "z.npy")[rows], atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "lv.npy"), np.load(run1 / "z_logvar.npy")[rows], atol=1e-5)


def test_volumes_cli_writes_series_with_voxel_size(run1, tmp_path):
    out = tmp_path / "vols"
    assert main(["volumes", str(run1), "-o", str(out), "--z=-0.5,0,0.5"]) == 0
    names = sorted(p.name for p in out.glob("*.mrc"))
    assert names == ["vol_000.mrc", "vol_001.mrc", "vol_002.mrc"]
    z = np.loadtxt(out / "z_values.txt", ndmin=2)
    np.testing.assert_allclose(z[:, 0], [-0.5, 0, 0.5])
    v, apix = read_mrc(out / "vol_001.mrc", mmap=False)
    assert v.shape == (16, 16, 16) and apix == pytest.approx(8.0)
    np.save(tmp_path / "z.npy", np.array([[0.25]], dtype=np.float32))
    assert main(["volumes", str(run1), "-o", str(out), "--z-file", str(tmp_path / "z.npy"), "-D", "24"]) == 0
    assert sorted(p.name for p in out.glob("*.mrc")) == ["vol_000.mrc"]  # the stale series is gone
    v, apix = read_mrc(out / "vol_000.mrc", mmap=False)
    assert v.shape == (24, 24, 24) and apix == pytest.approx(8.0 * 16 / 24, rel=1e-5)


def test_homogeneous_run_and_its_volume(tiny, tmp_path):
    out = tmp_path / "homo"
    assert main(["train", str(tiny.table), str(tiny.stack), "-o", str(out), "--epochs", "1", "--zdim", "0",
                 "--dec-dim", "32", "--dec-layers", "1", "--threads", "1"]) == 0
    assert np.load(out / "z.npy").shape == (240, 0)
    assert main(["volumes", str(out), "-o", str(tmp_path / "v")]) == 0
    assert (tmp_path / "v" / "vol_000.mrc").exists()


# ---- data path ----------------------------------------------------------------------------------------
def test_streamed_batches_equal_in_memory_batches(tiny):
    table = read_table(tiny.table)
    src = open_particles(tiny.stack, table)
    rows = np.arange(3, 240, 2)
    lat = HalfLattice(16)
    mem = ParticleData(src, table, rows, lat, 7.0, torch.device("cpu"), mode="memory", progress=False)
    st = ParticleData(src, table, rows, lat, 7.0, torch.device("cpu"), mode="stream", chunk=25,
                      progress=False)
    assert (mem.mode, st.mode) == ("memory", "stream")
    order = st.epoch_order(np.arange(len(rows)), seed=1, epoch=4)
    assert sorted(order) == list(range(len(rows)))
    assert np.count_nonzero(np.diff(order // 25)) == 4  # 5 chunks, each visited in one run
    assert not np.array_equal(np.unique(order // 25, return_index=True)[1], np.arange(0, 119, 25))
    bm, bs = list(mem.batches(order, 8, start=16)), list(st.batches(order, 8, start=16))
    assert len(bm) == len(bs) == int(np.ceil((len(rows) - 16) / 8))
    for a, b in zip(bm, bs):
        assert torch.equal(a.pos, b.pos)
        torch.testing.assert_close(a.y, b.y)
        torch.testing.assert_close(a.ctf, b.ctf)
        torch.testing.assert_close(a.A, b.A)


def test_auto_mode_streams_when_memory_is_short(tiny, monkeypatch):
    import drgn_core.data as data

    table = read_table(tiny.table)
    src = open_particles(tiny.stack, table)
    monkeypatch.setattr(data, "_bytes_available", lambda device: 1000)
    d = ParticleData(src, table, np.arange(240), HalfLattice(16), 1.0, torch.device("cpu"), progress=False)
    assert d.mode == "stream" and d.y is None


# ---- errors -------------------------------------------------------------------------------------------
def test_stack_that_does_not_match_the_table(tiny, tmp_path, capsys):
    from drgn_core.io.mrc import write_mrc

    short = tmp_path / "short.mrcs"
    write_mrc(short, read_mrc(tiny.stack, mmap=False)[0][:100], 8.0, stack=True)
    assert main(["train", str(tiny.table), str(short), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drgn train: error: ") and "short.mrcs" in err
    assert "holds 100 images but the particle table has 240 rows" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_missing_run_directory(tiny, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["encode", str(missing), str(tiny.table), str(tiny.stack),
                 "-o", str(tmp_path / "z.npy")]) == 2
    assert f"{missing}: no such run directory or model file" in capsys.readouterr().err
    assert main(["volumes", str(missing), "-o", str(tmp_path / "v"), "--z", "0"]) == 2
    assert f"{missing}: no such run directory or model file" in capsys.readouterr().err
    assert main(["train", str(tiny.table), str(tiny.stack), "-o", str(missing), "--resume"]) == 2
    assert f"{missing}: has no config.yaml: not a drgn train run directory" in capsys.readouterr().err


@pytest.mark.parametrize(("rows", "message"), [
    (np.array([1, 2, 2]), "index 2 appears 2 times"),
    (np.array([0, 240]), "index 240 is out of range: the table has 240 rows"),
    (np.array([0.5, 1.0]), "holds float64 values; expected integer row indices"),
])
def test_bad_index_files(tiny, tmp_path, capsys, rows, message):
    ind = tmp_path / "ind.npy"
    np.save(ind, rows)
    assert main(["train", str(tiny.table), str(tiny.stack), "-o", str(tmp_path / "r"),
                 "--ind", str(ind)]) == 2
    err = capsys.readouterr().err
    assert f"{ind}: {message}" in err


def test_bad_options_and_wrong_box(run1, tiny, tmp_path, capsys):
    assert main(["train", str(tiny.table), str(tiny.stack), "-o", str(tmp_path / "r"),
                 "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    assert main(["volumes", str(run1), "-o", str(tmp_path / "v"), "--z", "1,2", "--lowpass", "3"]) == 2
    assert "finer than Nyquist" in capsys.readouterr().err
    other = render(tmp_path / "d24", n=240, D=24, kind="none", seed=1)
    assert main(["encode", str(run1), str(other.table), str(other.stack), "-o", str(tmp_path / "z.npy")]) == 2
    assert "images are 24 px but the model was trained at D = 16" in capsys.readouterr().err


def test_auto_precision_follows_the_hardware(monkeypatch, tmp_path):
    """'auto' is bf16 only where the CPU multiplies bf16 natively (emulated bf16 is slower than fp32), and the
    precision a run used is stored in model.pt so that `drgn encode` reproduces its z.npy."""
    from drgn_core import train as train_mod

    cpu = torch.device("cpu")
    assert train_mod.resolve_precision("fp32", cpu) is None
    assert train_mod.resolve_precision("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: True)
    assert train_mod.resolve_precision("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: False)
    assert train_mod.resolve_precision("auto", cpu) is None


def test_model_file_records_the_training_precision(run1):
    from drgn_core.models import load_model

    payload = torch.load(run1 / "model.pt", weights_only=True)
    assert payload["precision"] in ("bf16", "fp32")
    model, _ = load_model(run1 / "model.pt")
    assert model.trained_precision == payload["precision"]


RUN_OUTPUTS = ["model.pt", "z.npy", "indices.npy", "config.yaml", "train_log.csv"]  # the workflow's outputs


def _as_snakemake_leaves_it(run: Path) -> None:
    """Delete a run's declared workflow outputs, as Snakemake does before it reruns a job."""
    for name in RUN_OUTPUTS:
        (run / name).unlink(missing_ok=True)


def test_auto_resume_continues_a_run_whose_outputs_were_deleted(run1, tiny, tmp_path, capsys):
    """--auto-resume after a workflow manager removed the outputs of a 1-epoch run: it continues from the
    checkpoint to 2 epochs and ends with the same weights as run1's uninterrupted 2 epochs."""
    base = ["train", str(tiny.table), str(tiny.stack), *TINY, "--auto-resume"]
    run = tmp_path / "run"
    assert main([*base, "-o", str(run), "--epochs", "1"]) == 0  # no checkpoint yet: a fresh run
    assert "resuming" not in capsys.readouterr().err
    _as_snakemake_leaves_it(run)
    assert main([*base, "-o", str(run), "--epochs", "2"]) == 0
    assert "resuming" in capsys.readouterr().err
    a, b = _state(run1), _state(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["epochs"] == 2
    assert list(np.genfromtxt(run / "train_log.csv", delimiter=",", names=True)["epoch"]) == [1, 2]


def test_auto_resume_starts_afresh_on_a_leftover_of_another_run(run1, tiny, tmp_path, capsys):
    import shutil

    base = ["train", str(tiny.table), str(tiny.stack), *TINY, "--auto-resume"]
    # a leftover checkpoint of a finished run, outputs removed (a forced rerun): trains again from scratch
    run = tmp_path / "forced"
    shutil.copytree(run1, run)
    _as_snakemake_leaves_it(run)
    assert main([*base, "-o", str(run), "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert "starting afresh" in err and f"resuming {run} at" not in err
    assert all(torch.equal(v, _state(run)[k]) for k, v in _state(run1).items())  # CPU: same weights

    # a leftover of a run with other settings: discarded, the new settings train from scratch
    other = tmp_path / "other"
    shutil.copytree(run1, other)
    _as_snakemake_leaves_it(other)
    assert main([*base[:-1], "--lr", "0.01", "--auto-resume", "-o", str(other), "--epochs", "2"]) == 0
    assert "cannot resume with different settings: lr" in capsys.readouterr().err
    assert yaml.safe_load((other / "config.yaml").read_text())["training"]["lr"] == 0.01

    # a complete run with other settings is never discarded
    kept = tmp_path / "kept"
    shutil.copytree(run1, kept)
    before = (kept / "model.pt").read_bytes()
    assert main([*base[:-1], "--lr", "0.01", "--auto-resume", "-o", str(kept), "--epochs", "2"]) == 2
    assert "cannot resume with different settings" in capsys.readouterr().err
    assert (kept / "model.pt").read_bytes() == before


def test_overfitting_note_names_the_epoch_the_validation_loss_turned():
    from drgn_core.train import overfitting_note

    # the 20,000-image uniform hinge run (bench/train_accuracy.py, 10 % held out): validation loss lowest
    # at epoch 3, then rising while the training loss fell; held-out |ρ| was 0.06 against 0.97 trained
    train = [0.91233, 0.90412, 0.90302, 0.90165, 0.90017, 0.89841, 0.89614, 0.89409, 0.89268, 0.89172]
    val = [0.90443, 0.90416, 0.90346, 0.90358, 0.90419, 0.90526, 0.90744, 0.90781, 0.90888, 0.90943]
    rows = [{"epoch": i + 1, "loss": t, "val_loss": v} for i, (t, v) in enumerate(zip(train, val))]
    note = overfitting_note(rows)
    assert note is not None and "since epoch 3 (0.90346 -> 0.90943)" in note and "over-fits" in note
    # still improving, a rise within the tolerance, too recent a minimum, or no validation: no note
    assert overfitting_note([{**r, "val_loss": r["loss"]} for r in rows]) is None
    assert overfitting_note([{**r, "val_loss": 0.9 + 1e-5 * (r["epoch"] == 10)} for r in rows]) is None
    assert overfitting_note(rows[:5]) is None
    assert overfitting_note([{**r, "val_loss": float("nan")} for r in rows]) is None
