"""`drgn train`'s learning-rate schedule, batch scaling and training subset (drgn_core/schedule.py,
drgn_core/train_subset.py): the rate at every step against the formulas written out here, a killed and
resumed scheduled run against an uninterrupted one, and a subset-trained run that encodes every particle."""

from __future__ import annotations

import math
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
from drgn_core.schedule import LrSchedule, scaled_lr, schedule_for

TINY = TINY_TRAIN
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return render_tiny(tmp_path_factory.mktemp("tiny"))


def _steps(run: Path) -> np.ndarray:
    return np.genfromtxt(run / "train_steps.csv", delimiter=",", names=True)


# ---- the formulas ---------------------------------------------------------------------------------------
def test_constant_schedule_with_warmup_ramps_linearly_then_holds():
    s = LrSchedule(base=1e-3, kind="constant", warmup_steps=4, total_steps=100)
    assert [s.lr(g) for g in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert s.lr(10_000) == 1e-3


def test_cosine_schedule_hits_its_analytic_points():
    s = LrSchedule(base=1e-3, kind="cosine", warmup_steps=10, total_steps=110, final=0.1)
    assert s.lr(9) == pytest.approx(1e-3)                       # end of the warm-up: the peak
    assert s.lr(10) == pytest.approx(1e-3)                      # decay starts at the peak
    assert s.lr(60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: the mean of peak and floor
    assert s.lr(35) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert s.lr(110) == pytest.approx(1e-4) and s.lr(500) == pytest.approx(1e-4)  # then it stays there
    assert all(s.lr(g) >= s.lr(g + 1) for g in range(10, 120))


def test_step_schedule_drops_geometrically_to_the_final_rate():
    s = LrSchedule(base=1.0, kind="step", warmup_steps=0, total_steps=90, final=0.01, drops=2)
    assert [s.lr(g) for g in (0, 29, 30, 59, 60, 89, 90)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01, 0.01])


def test_batch_scaling_rules():
    assert scaled_lr(1e-4, 64, 8, "none") == 1e-4
    assert scaled_lr(1e-4, 64, 8, "sqrt") == pytest.approx(1e-4 * math.sqrt(8))
    assert scaled_lr(1e-4, 64, 8, "linear") == pytest.approx(8e-4)
    assert scaled_lr(1e-4, 2, 8, "sqrt") == pytest.approx(0.5e-4)
    s = schedule_for(1e-4, 32, 10, kind="cosine", warmup_epochs=0.5, scale="linear", horizon_epochs=3)
    assert (s.base, s.warmup_steps, s.total_steps) == (pytest.approx(4e-4), 5, 30)


# ---- in a real run --------------------------------------------------------------------------------------
def test_every_step_of_a_cosine_run_uses_the_analytic_rate(tiny, tmp_path):
    """216 training images, batch 8: 27 steps per epoch; 1 warm-up epoch, then cosine over 2 more to 0.1."""
    run = tmp_path / "cos"
    assert main(["train", str(tiny.table), str(tiny.stack), "-o", str(run), "--epochs", "3", *TINY,
                 "--lr-schedule", "cosine", "--warmup-epochs", "1", "--lr-final", "0.1", "--log-steps"]) == 0
    steps = _steps(run)
    g = (steps["epoch"] - 1) * 27 + steps["step"] - 1                 # 0-based global step
    assert np.array_equal(g, np.arange(81))
    want = np.where(g < 27, 1e-3 * (g + 1) / 27,
                    1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (g - 27) / 54))))
    np.testing.assert_allclose(steps["lr"], want, rtol=1e-7)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["training"]["lr_schedule"] == "cosine" and cfg["training"]["lr_decay_epochs"] == 3
    assert cfg["lr_schedule"]["warmup_steps"] == 27 and cfg["lr_schedule"]["total_steps"] == 81
    assert cfg["lr_schedule"]["final_lr"] == pytest.approx(1e-4)
    log = np.genfromtxt(run / "train_log.csv", delimiter=",", names=True)
    np.testing.assert_allclose(log["lr"], want[[26, 53, 80]], rtol=1e-5)  # last step of each epoch (6 digits)
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["lr_schedule"] == cfg["lr_schedule"]


def test_a_killed_scheduled_run_resumes_to_the_same_weights(tiny, tmp_path, capsys):
    """As tests/test_train.py's SIGKILL test, with a warm-up and a step decay that cross the kill point."""
    args = [str(tiny.table), str(tiny.stack), "--epochs", "3", *TINY, "--checkpoint-minutes", "0.0002",
            "--lr-schedule", "step", "--lr-drops", "3", "--lr-final", "0.05", "--warmup-epochs", "0.5"]
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
    assert main(["train", *args, "-o", str(cut), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().err
    a = torch.load(full / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(cut / "model.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = np.genfromtxt(full / "train_log.csv", delimiter=",", names=True)
    lb = np.genfromtxt(cut / "train_log.csv", delimiter=",", names=True)
    for col in ("loss", "val_loss", "lr"):
        np.testing.assert_array_equal(la[col], lb[col])
    # a changed schedule is another run, refused on resume
    assert main(["train", *args[:-1], "1", "-o", str(cut), "--resume"]) == 2
    assert "cannot resume with different settings: warmup_epochs" in capsys.readouterr().err


def test_a_larger_batch_trains_at_the_scaled_rate(tiny, tmp_path):
    run = tmp_path / "big"
    assert main(["train", str(tiny.table), str(tiny.stack), "-o", str(run), "--epochs", "1", *TINY,
                 "--batch-size", "32", "--lr-scale", "sqrt", "--log-steps"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["training"]["lr"] == 1e-3 and cfg["training"]["lr_scale"] == "sqrt"
    assert cfg["lr_schedule"]["base_lr"] == pytest.approx(2e-3)     # 1e-3 · sqrt(32 / 8)
    steps = _steps(run)
    assert len(steps) == 7 and np.allclose(steps["lr"], 2e-3)       # ceil(216 / 32) steps
    assert main(["train", str(tiny.table), str(tiny.stack), "-o", str(tmp_path / "lin"), "--epochs", "1",
                 *TINY, "--batch-size", "16", "--lr-scale", "linear", "--lr-ref-batch", "4"]) == 0
    cfg = yaml.safe_load((tmp_path / "lin" / "config.yaml").read_text())
    assert cfg["lr_schedule"]["base_lr"] == pytest.approx(4e-3)     # 1e-3 · 16 / 4


def test_bad_schedule_options_are_one_line_errors(tiny, tmp_path, capsys):
    base = ["train", str(tiny.table), str(tiny.stack), "-o", str(tmp_path / "r"), *TINY]
    assert main([*base, "--lr-final", "1.5"]) == 2
    assert "--lr-final must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert main([*base, "--train-subset", "5000"]) == 2
    assert "--train-subset 5000 is more than the 216 particles left to train on" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--train-subset", "1.5"])
    assert "expected a count >= 1 or a fraction in (0, 1), got '1.5'" in capsys.readouterr().err
    assert not (tmp_path / "r" / "model.pt").exists()


# ---- training subset ------------------------------------------------------------------------------------
def test_subset_run_trains_on_the_seeded_rows_and_encodes_every_particle(tiny, tmp_path):
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        runs[name] = tmp_path / name
        assert main(["train", str(tiny.table), str(tiny.stack), "-o", str(runs[name]), "--epochs", "1",
                     *TINY, "--seed", seed, "--train-subset", "0.25", "--log-steps"]) == 0
    a = runs["a"]
    z, sub, val = np.load(a / "z.npy"), np.load(a / "train_indices.npy"), np.load(a / "val_indices.npy")
    assert z.shape == (240, 1) and np.isfinite(z).all()               # every particle encoded
    assert np.array_equal(np.load(a / "indices.npy"), np.arange(240))
    assert len(sub) == 54 and np.all(np.diff(sub) > 0)                # 0.25 × 216 training rows
    assert not set(sub) & set(val)                                    # never a validation row
    assert np.array_equal(sub, np.load(runs["b"] / "train_indices.npy"))       # same seed, same rows
    assert not np.array_equal(sub, np.load(runs["c"] / "train_indices.npy"))   # another seed, others
    assert len(_steps(a)) == 7                                        # an epoch visits the subset only
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    assert cfg["training"]["train_subset"] == 0.25 and cfg["inputs"]["n_train"] == 54
    # analyses and drgn evaluate name every row the encoder never saw as held out
    from drgn_core.rundir import held_out_mask

    assert np.array_equal(held_out_mask(a, np.arange(240)), ~np.isin(np.arange(240), sub))


@pytest.mark.slow
def test_subset_trained_latent_orders_held_in_and_held_out_particles(tmp_path):
    """The CI continuous set (tests/test_train_accuracy.py: 3,000 hinge images, D 32, SNR 1) trained on a
    seeded 1,500 for 12 epochs, half the CPU time of training on all 3,000.

    Measured (bench/lr_levers.py, bench/README.md "Learning-rate schedule, batch scaling, training
    subset"): the rows trained on are ordered as well as by a run on every row (|ρ| 0.964 against 0.964),
    the 1,500 never seen only to 0.555, because at this size the encoder memorises its images rather than
    learning a pose-independent map (the same reason the workflow trains with --val-frac 0). The bounds
    (0.93, 0.4) leave room for other CPUs' rounding; an encoder that did not encode the unseen rows, or a
    subset drawn from the wrong rows, would put held-out |ρ| near 0 (1,500 random values: |ρ| < 0.06)."""
    from scipy.stats import spearmanr

    ds = render(tmp_path / "data", n=3000, D=32, kind="continuous", snr=1.0, apix=5.0, seed=0)
    run = tmp_path / "run"
    assert main(["train", str(ds.table), str(ds.stack), "-o", str(run), "--zdim", "1", "--epochs", "12",
                 "--enc-dim", "128", "--enc-layers", "2", "--dec-dim", "128", "--dec-layers", "2", "--lr",
                 "1e-3", "--threads", "1", "--val-frac", "0", "--seed", "0", "--train-subset", "1500"]) == 0
    z = np.load(run / "z.npy")[:, 0]
    held_in = np.zeros(3000, bool)
    held_in[np.load(run / "train_indices.npy")] = True
    assert held_in.sum() == 1500
    rho_in = abs(spearmanr(z[held_in], ds.gt_coord[held_in]).statistic)
    rho_out = abs(spearmanr(z[~held_in], ds.gt_coord[~held_in]).statistic)
    assert rho_in >= 0.93 and rho_out >= 0.4, (rho_in, rho_out)
