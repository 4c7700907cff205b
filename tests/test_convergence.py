"""`drgn convergence` and `drgn train --epochs auto`: the three measures against cases whose answer is known,
the stopping rule, the command's outputs and errors, and auto on the CI-size continuous set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_train import render

from drgn_core.cli import main
from drgn_core.convergence import (
    AUTO_MAX_LATENT_CHANGE,
    AUTO_MIN_MAP_AGREEMENT,
    AUTO_PATIENCE,
    choose_rows,
    latent_change,
    map_agreement,
    neighbours_kept,
    settled,
)

TINY = ["--zdim", "2", "--enc-dim", "32", "--enc-layers", "1", "--dec-dim", "32", "--dec-layers", "1",
        "--threads", "1", "--lr", "1e-3", "--device", "cpu", "--val-frac", "0"]


# ---- the measures ---------------------------------------------------------------------------------
def test_an_affine_change_of_the_latent_counts_as_no_change():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3000, 4))
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))  # rotation / reflection
    moved = 3.0 * z @ q + np.array([1.0, -2.0, 0.5, 7.0])
    assert latent_change(z, moved) < 1e-12
    assert neighbours_kept(z, moved) == pytest.approx(1.0)


def test_a_reordered_latent_counts_as_all_change():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3000, 3))
    shuffled = z[rng.permutation(len(z))]
    assert latent_change(z, shuffled) > 0.95
    # neighbours of a random relabelling: k / (n - 1) expected by chance with 2,000 sampled particles
    assert neighbours_kept(z, shuffled) < 0.02


def test_latent_change_is_the_unexplained_variance_fraction():
    """z_b = z_a + independent noise of variance s² per axis: the affine fit leaves s²/(1+s²) of z_b's
    variance and, fitting back, s²/(1+s²) of z_a's; the measure is their mean."""
    rng = np.random.default_rng(2)
    za = rng.normal(size=(20000, 2))
    s2 = 0.25
    zb = za + rng.normal(size=za.shape) * np.sqrt(s2)
    assert latent_change(za, zb) == pytest.approx(s2 / (1 + s2), abs=0.01)


def test_map_agreement_is_one_for_identical_maps_and_falls_with_noise():
    rng = np.random.default_rng(3)
    D = 32
    v = rng.normal(size=(2, D, D, D))
    assert map_agreement(v, v) == pytest.approx([1.0, 1.0])
    noisy = v + rng.normal(size=v.shape)  # equal signal and noise power: FSC 1/√2 in every shell
    # trapezoid of |FSC| over r/D, r = 0 … D/2-1, over its maximum; FSC(0) = 1 by convention and shell 1
    # (0 <= |k|·D < 1) holds the DC term alone, so |FSC(1)| = 1 too
    c, n = np.sqrt(0.5), D // 2
    expected = (1 + (1 + c) / 2 + (n - 3) * c) / (n - 1)
    assert map_agreement(v, noisy) == pytest.approx([expected] * 2, abs=0.02)


def test_points_are_particles_near_kmeans_centres():
    rng = np.random.default_rng(4)
    centres = np.array([[0.0, 0], [10, 0], [0, 10]])
    z = np.concatenate([c + rng.normal(size=(100, 2)) * 0.3 for c in centres])
    rows = choose_rows(z, 3, seed=0)
    assert len(rows) == 3
    assert sorted(np.round(z[rows] / 10).astype(int).tolist()) == [[0, 0], [0, 1], [1, 0]]


def test_the_rule_needs_every_measure_settled_for_consecutive_epochs():
    ok = {"latent_change": 0.01, "neighbours_kept": 0.9, "map_agreement": 0.97}
    hist = [{"epoch": e, **ok} for e in range(2, 10)]
    assert settled(hist[:2], 3) is None                      # too few pairs
    assert settled(hist[:AUTO_PATIENCE], AUTO_PATIENCE + 1) is None  # before the minimum epochs
    reason = settled(hist, 9)
    assert reason and "settled after epoch 9" in reason
    moved = [*hist[:-3], *({**h, "latent_change": 2 * AUTO_MAX_LATENT_CHANGE} for h in hist[-3:])]
    assert settled(moved, 9) is None                         # the latent moves (more than before) ...
    plateau = [{**h, "latent_change": 0.2} for h in hist]
    assert "levelled off" in settled(plateau, 9)             # ... its change levelled off above the limit
    falling = [{**h, "latent_change": 0.3 * 0.9 ** h["epoch"]} for h in hist]
    assert max(h["latent_change"] for h in falling) > AUTO_MAX_LATENT_CHANGE
    assert settled(falling, 9) is None
    blurred = [*hist[:-2], {**hist[-2], "map_agreement": AUTO_MIN_MAP_AGREEMENT - 0.01}, hist[-1]]
    assert settled(blurred, 9) is None
    lost = [*hist[:-1], {**hist[-1], "neighbours_kept": 0.5}]  # a reorganisation: neighbours lost
    assert settled(lost, 9) is None
    gap = [h for h in hist if h["epoch"] != 8]               # not consecutive
    assert settled(gap, 9) is None


# ---- the command on a tiny run ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conv")
    ds = render(tmp / "data", n=240, D=16, kind="continuous", snr=1.0, apix=8.0, seed=3)
    run = tmp / "run"
    assert main(["train", str(ds.table), str(ds.stack), "-o", str(run), "--epochs", "3", "--encode-every",
                 "1", *TINY]) == 0
    return ds, run


def test_convergence_command_writes_json_and_plot(tiny_run, capsys):
    _, run = tiny_run
    assert sorted(p.name for p in (run / "checkpoints").glob("*.0*")) == [
        "model.001.pt", "model.002.pt", "z.001.npy", "z.002.npy"]
    assert main(["convergence", str(run), "-o", str(run / "conv"), "--points", "2"]) == 0
    res = json.loads((run / "conv" / "convergence.json").read_text())
    assert res["epochs"] == [1, 2, 3]
    assert [p["epoch"] for p in res["pairs"]] == [2, 3]
    for p in res["pairs"]:
        assert 0 <= p["latent_change"] <= 1 and 0 <= p["neighbours_kept"] <= 1
        assert len(p["map_agreement_per_point"]) == len(res["map_rows"]) == 2
        assert p["map_agreement"] == pytest.approx(np.mean(p["map_agreement_per_point"]))
        assert p["map_agreement_worst"] == min(p["map_agreement_per_point"])
    # the last pair compares z.002 with the final z.npy, which is exactly epoch 3's latent
    z2, z3 = np.load(run / "checkpoints" / "z.002.npy"), np.load(run / "z.npy")
    assert res["pairs"][-1]["latent_change"] == pytest.approx(latent_change(z2, z3))
    assert (run / "conv" / "convergence.png").stat().st_size > 5000
    assert "2 epoch pairs compared" in capsys.readouterr().out


def test_convergence_without_snapshots_is_a_one_line_error(tiny_run, tmp_path, capsys):
    ds, _ = tiny_run
    run = tmp_path / "plain"
    assert main(["train", str(ds.table), str(ds.stack), "-o", str(run), "--epochs", "1", *TINY]) == 0
    capsys.readouterr()
    assert main(["convergence", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(run) in err and "--encode-every 1" in err and len(err.splitlines()) == 1
    assert not (run / "convergence").exists()


def test_max_epochs_without_auto_is_refused(tiny_run, tmp_path, capsys):
    ds, _ = tiny_run
    assert main(["train", str(ds.table), str(ds.stack), "-o", str(tmp_path / "r"), "--epochs", "3",
                 "--max-epochs", "5", *TINY]) == 2
    assert "--max-epochs is for --epochs auto" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main(["train", str(ds.table), str(ds.stack), "-o", str(tmp_path / "r"), "--epochs", "some", *TINY])
    assert e.value.code == 2
    assert "--epochs: expected a whole number or 'auto', got 'some'" in capsys.readouterr().err


def test_fixed_runs_record_why_they_stopped(tiny_run):
    _, run = tiny_run
    stopped = yaml.safe_load((run / "config.yaml").read_text())["stopped"]
    assert stopped == {"epoch": 3, "auto": False, "max_epochs": 3, "early": False,
                       "reason": "trained the 3 epochs asked (--epochs)"}


def test_auto_snapshots_leave_the_training_unchanged(tiny_run, tmp_path):
    """An auto run that reaches its maximum ends with exactly the weights of a fixed run of as many epochs:
    the snapshots and comparisons draw no random numbers and touch no training state."""
    import torch

    ds, fixed = tiny_run
    run = tmp_path / "auto"
    assert main(["train", str(ds.table), str(ds.stack), "-o", str(run), "--epochs", "auto", "--max-epochs",
                 "3", *TINY]) == 0
    a = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(fixed / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    stopped = yaml.safe_load((run / "config.yaml").read_text())["stopped"]
    assert stopped["auto"] and not stopped["early"] and stopped["epoch"] == 3
    assert stopped["reason"].startswith("reached the maximum of 3 epochs")
    log = (run / "train_log.csv").read_text().splitlines()
    assert log[0].endswith("latent_change,neighbours_kept,map_agreement")
    assert log[1].endswith("nan,nan,nan") and "nan" not in log[3].split(",")[-3:]  # epoch 1: nothing before
    assert (run / "convergence.png").exists() and (run / "checkpoints" / "map_rows.npy").exists()


@pytest.mark.slow
def test_epochs_auto_stops_early_within_0_01_of_a_long_run(tmp_path):
    """The CI-size continuous set of test_train_accuracy: --epochs auto (at most 20) stops before 20 with a
    reason in config.yaml; continuing the same run to 20 fixed epochs (identical, on the CPU, to a fresh
    20-epoch run: see the test above and test_train's resume tests) gains less than 0.01 in |ρ|."""
    from scipy.stats import spearmanr

    ds = render(tmp_path / "data", n=3000, D=32, kind="continuous", snr=1.0, apix=5.0, seed=0)
    small = ["--zdim", "1", "--enc-dim", "128", "--enc-layers", "2", "--dec-dim", "128", "--dec-layers", "2",
             "--lr", "1e-3", "--threads", "1", "--val-frac", "0", "--seed", "0", "--device", "cpu"]
    run, base = tmp_path / "run", ["train", str(ds.table), str(ds.stack), "-o", str(tmp_path / "run")]
    assert main([*base, "--epochs", "auto", "--max-epochs", "20", *small]) == 0
    stopped = yaml.safe_load((run / "config.yaml").read_text())["stopped"]
    assert stopped["auto"] and stopped["early"] and stopped["epoch"] < 20, stopped
    assert stopped["reason"].startswith(f"settled after epoch {stopped['epoch']}")
    rho_auto = abs(spearmanr(np.load(run / "z.npy")[:, 0], ds.gt_coord).statistic)

    assert main([*base, "--resume", "--epochs", "20", *small]) == 0
    long = yaml.safe_load((run / "config.yaml").read_text())["stopped"]
    assert long == {"epoch": 20, "auto": False, "max_epochs": 20, "early": False,
                    "reason": "trained the 20 epochs asked (--epochs)"}
    rho_long = abs(spearmanr(np.load(run / "z.npy")[:, 0], ds.gt_coord).statistic)
    assert rho_auto >= rho_long - 0.01, (stopped["epoch"], rho_auto, rho_long)


def test_summary_says_why_each_run_stopped(tiny_run):
    from drgn_core.summary import read_training_run, to_html

    _, run = tiny_run
    row = read_training_run(run, "pilot/z1")
    assert row["stopped"] == "trained the 3 epochs asked (--epochs)"
    page = to_html({"training": [row]})
    assert "<th>stopped</th>" in page and "trained the 3 epochs asked (--epochs)" in page


@pytest.mark.parametrize("value, ok", [("auto", True), (12, True), ("often", False), (0, False)])
def test_workflow_config_takes_epochs_auto(tmp_path, capsys, value, ok):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"highres": {"train": {"epochs": value, "max_epochs": 30}}}))
    assert main(["check-config", str(cfg)]) == (0 if ok else 2)
    if not ok:
        err = capsys.readouterr().err
        assert f"key 'highres.train.epochs': expected an integer >= 1 or 'auto', found {value!r}" in err
