"""Data-parallel training on the CPU (two gloo processes started by `drgn train --nproc 2` through torchrun):
the same optimisation as one process with the same global batch, latents gathered in row order, and a job
killed mid-epoch resumed on two processes and on one.

Why the tolerances are what they are: two processes sum the gradients of two half-batches, one process
computes the gradient of the whole batch; the two differ in the last bits (float32 summation order), and
training amplifies such differences step by step. With the CI-size set, global batch 64 and the paper's
learning rate, the per-step losses of 2 epochs (86 steps) stay within 1e-5 of each other (measured:
< 1e-6), and the weights within 1e-3 of each other.
"""

from __future__ import annotations

import os
import shutil
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
from conftest_train import render

from drgn_core.cli import main

OPTS = ["--zdim", "1", "--enc-dim", "64", "--enc-layers", "2", "--dec-dim", "64", "--dec-layers", "2",
        "--threads", "1", "--device", "cpu", "--precision", "fp32", "--epochs", "2", "--batch-size", "64",
        "--val-frac", "0.1", "--log-steps"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ci(tmp_path_factory):
    """The CI-size continuous set of tests/test_train_accuracy.py (3,000 images, D = 32)."""
    return render(tmp_path_factory.mktemp("ci"), n=3000, D=32, kind="continuous", snr=1.0, apix=5.0, seed=0)


def _drgn(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "drgn_core.cli", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def single(ci, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", str(ci.table), str(ci.stack), "-o", str(out), *OPTS]) == 0
    return out


@pytest.fixture(scope="module")
def ddp(ci, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    p = _drgn("train", str(ci.table), str(ci.stack), "-o", str(out), *OPTS, "--nproc", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _steps(run: Path) -> np.ndarray:
    return np.genfromtxt(run / "train_steps.csv", delimiter=",", names=True)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)["state_dict"]


def _max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_two_processes_follow_one_process_step_by_step(single, ddp):
    s, d = _steps(single), _steps(ddp)
    steps_per_epoch = int(np.ceil(2700 / 64))
    assert len(s) == len(d) == 2 * steps_per_epoch
    assert np.array_equal(s["images"], d["images"]) and s["images"][steps_per_epoch - 1] == 2700 % 64
    for col in ("loss", "mse", "kl"):
        np.testing.assert_allclose(d[col], s[col], rtol=0, atol=1e-5 if col != "kl" else 1e-3)
    assert np.abs(d["loss"] - s["loss"]).max() < 1e-5
    assert _max_weight_diff(single, ddp) < 1e-3
    # the validation loss, computed on each process's share and added up, is the same too
    ls = np.genfromtxt(single / "train_log.csv", delimiter=",", names=True)
    ld = np.genfromtxt(ddp / "train_log.csv", delimiter=",", names=True)
    np.testing.assert_allclose(ld["val_loss"], ls["val_loss"], rtol=1e-4)


def test_run_config_records_processes_global_batch_and_lr(ddp, single):
    d = yaml.safe_load((ddp / "config.yaml").read_text())["distributed"]
    assert d == {"world_size": 2, "backend": "gloo", "device_type": "cpu", "global_batch": 64,
                 "batch_per_process": 32, "lr": 1e-4}
    assert yaml.safe_load((single / "config.yaml").read_text())["distributed"]["world_size"] == 1
    # only rank 0 wrote: one header, no interleaved rows
    assert (ddp / "train_steps.csv").read_text().count("epoch,step") == 1


def test_ddp_latents_equal_single_process_encode(ddp, ci, tmp_path):
    out = tmp_path / "z.npy"
    assert main(["encode", str(ddp), str(ci.table), str(ci.stack), "-o", str(out), "--device", "cpu",
                 "--threads", "1"]) == 0
    z_ddp, z_enc = np.load(ddp / "z.npy"), np.load(out)
    assert z_ddp.shape == (3000, 1)
    np.testing.assert_allclose(z_ddp, z_enc, rtol=0, atol=1e-5)
    assert np.array_equal(np.load(ddp / "indices.npy"), np.arange(3000))


def _worker(launcher: int, rank: int) -> int | None:
    """PID of the torchrun worker with RANK=rank among the launcher's children."""
    try:
        kids = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    except OSError:
        return None
    for pid in map(int, kids):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def test_killed_rank_resumes_on_two_and_on_one_process(ddp, ci, tmp_path, capsys):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "drgn_core.cli", "train", str(ci.table), str(ci.stack), "-o", str(run),
           *OPTS, "--nproc", "2", "--checkpoint-minutes", "0.0001"]  # a checkpoint after every step
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ck = run / "checkpoints" / "last.pt"
    killed = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if ck.exists():
                try:
                    state = torch.load(ck, weights_only=True)
                except Exception:  # replaced while being read: try again
                    state = None
                if state and state["epoch"] == 0 and state["step"] >= 5:
                    killed = _worker(proc.pid, 1)
                    if killed:
                        os.kill(killed, signal.SIGKILL)
                        break
            time.sleep(0.05)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the job finished before a rank could be killed"
    assert rc != 0 and not (run / "model.pt").exists()
    ck_state = torch.load(ck, weights_only=True)
    assert ck_state["epoch"] == 0 and 0 < ck_state["step"] < 43

    on_two, on_one = tmp_path / "two", tmp_path / "one"
    shutil.copytree(run, on_two)
    shutil.copytree(run, on_one)
    p = _drgn("train", str(ci.table), str(ci.stack), "-o", str(on_two), *OPTS, "--nproc", "2", "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    capsys.readouterr()
    assert main(["train", str(ci.table), str(ci.stack), "-o", str(on_one), *OPTS, "--resume"]) == 0
    assert "resuming with 1 process where the run had 2" in capsys.readouterr().err

    for resumed, world in ((on_two, 2), (on_one, 1)):
        assert _max_weight_diff(resumed, ddp) < 1e-3
        np.testing.assert_allclose(np.load(resumed / "z.npy"), np.load(ddp / "z.npy"), rtol=0, atol=1e-2)
        ld = np.genfromtxt(resumed / "train_log.csv", delimiter=",", names=True)
        lr = np.genfromtxt(ddp / "train_log.csv", delimiter=",", names=True)
        np.testing.assert_allclose(ld["loss"], lr["loss"], rtol=1e-4)
        cfg = yaml.safe_load((resumed / "config.yaml").read_text())
        assert cfg["distributed"]["world_size"] == world
        (entry,) = cfg["resumes"]
        assert entry["world_size"] == world and entry["previous_world_size"] == 2
        assert entry["epoch"] == 1 and entry["batch"] == ck_state["step"]
