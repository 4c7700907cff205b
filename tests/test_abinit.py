"""drgn abinit: rotation grids, the pose search against a known map, soft reconstruction, pose comparison,
the run directory it writes (read by drgn volumes / export), resume after a kill, export round trips."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from drgn_core.abinit.compare import MIRROR, pose_errors
from drgn_core.abinit.grid import base_grid, grid_spacing, rotation_angle, so3_exp
from drgn_core.abinit.search import PoseSearch, SearchConfig, SoftAccumulator, insert_slices, soft_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 2 soft rounds then 1 hard: the kill test resumes between the soft rounds, where the decayed sums carry over
TINY = ["--iterations", "3", "--soft-iterations", "2", "--minibatch", "100", "--base-rotations", "576",
        "--keep", "2", "--local-levels", "1", "--epochs", "2", "--pose-start", "1", "--threads", "1",
        "--dec-dim", "32", "--dec-layers", "1"]


def drgn(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "drgn_core.cli", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(out.stderr[-2000:])
    return out


@pytest.fixture(scope="module")
def sim32(tmp_path_factory) -> Path:
    """160 homogeneous particles, D 32, SNR 0.1 (the CI-size set of the search tests)."""
    from drgn_core.simulate import SimConfig, run_simulation

    d = tmp_path_factory.mktemp("abinit") / "sim"
    run_simulation(SimConfig(n=160, D=32, snr=0.1, heterogeneity="none", seed=5), d, progress=False)
    return d


def _truth(sim: Path):
    from drgn_core.data import open_particles, read_rows
    from drgn_core.io.mrc import read_mrc
    from drgn_core.io.table import read_table

    table = read_table(sim / "table.star")
    src = open_particles(sim / "particles.mrcs", table)
    vol = np.array(read_mrc(sim / "gt_volumes" / "vol_000.mrc")[0])
    rows = np.arange(len(table))
    return table, src, vol, read_rows(src, rows), table.ctf_params(src.apix)


def test_base_grid_covers_so3_evenly():
    n = 4608
    R = base_grid(n)
    assert R.shape == (n, 3, 3)
    assert np.allclose(R @ R.transpose(0, 2, 1), np.eye(3), atol=1e-9)
    # Haar-uniform rotations have E[R] = 0
    assert np.abs(R.mean(axis=0)).max() < 0.01
    q = Rotation.from_matrix(R).as_quat()
    dots = np.abs(q[:500] @ q.T)
    dots[np.arange(500), np.arange(500)] = 0
    nn = np.degrees(2 * np.arccos(np.clip(dots.max(axis=1), -1, 1)))
    spacing = np.degrees(grid_spacing(n))
    # nearest neighbours at about the analytic spacing of a uniform grid, none duplicated or isolated
    assert 0.7 * spacing < np.median(nn) < 1.5 * spacing
    assert nn.min() > 0.5 * spacing and nn.max() < 2 * spacing


def test_so3_exp_matches_scipy():
    v = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.2, 0.1], [1e-6, 0.0, 2e-6], [2.0, 1.0, -0.5]],
                     dtype=torch.float64)
    ref = Rotation.from_rotvec(v.numpy()).as_matrix()
    assert np.allclose(so3_exp(v).numpy(), ref, atol=1e-10)


def test_pose_errors_finds_hand_rotation_and_offset():
    rng = np.random.default_rng(0)
    At = Rotation.random(300, random_state=1).as_matrix().transpose(0, 2, 1)
    G = Rotation.from_euler("zyz", [40, 70, -20], degrees=True).as_matrix()
    noise = Rotation.from_rotvec(rng.normal(0, np.radians(2), (300, 3))).as_matrix()
    Af = MIRROR @ (noise @ At @ G) @ MIRROR      # the mirror-image map, globally rotated, 2° noise
    tt = rng.uniform(-3, 3, (300, 2))
    d = np.array([0.5, -1.0, 0.7])
    tf = tt + Af[:, :2, :] @ d                   # a 3D offset of the map, seen through each pose
    e = pose_errors(At, tt, Af, tf)
    assert e["hand"] == "flipped"
    assert 1.0 < e["median_rotation_error_deg"] < 4.0       # the 2° (per axis) noise, not the 60°+ offsets
    assert e["median_shift_error_px"] < 1e-6
    assert np.allclose(np.abs(e["map_offset_px"]), np.abs(d), atol=1e-6)


def test_map_in_true_frame_undoes_rotation_hand_and_offset(sim32):
    """A map built as the ab initio relation says (Vᶠ(x) = Vᵗ(G·x), mirrored, shifted by whole and half
    voxels) is brought back onto the truth: FSC(0.5) near Nyquist; with Gᵀ instead of G it is not."""
    from scipy.ndimage import affine_transform, shift

    from drgn_core.abinit.compare import map_in_true_frame, map_resolution
    from drgn_core.volumes import flip_hand

    _table, src, vol, _, _ = _truth(sim32)
    truth = vol.astype(np.float64)
    D = truth.shape[0]
    G = Rotation.from_euler("zyz", [40, 70, -20], degrees=True).as_matrix()
    rev = np.eye(3)[::-1]
    M = rev @ G @ rev                                             # V_f[i] = V_t[M·(i - c) + c]
    c = np.full(3, D // 2)
    found = affine_transform(truth, M, offset=c - M @ c, order=3)
    found = flip_hand(shift(found, (1.5, -2.0, 0.5), order=3, mode="wrap"))
    nyquist = 2 * src.apix
    assert map_resolution(map_in_true_frame(found, truth, G, "flipped"), truth, src.apix) < 1.15 * nyquist
    assert map_resolution(map_in_true_frame(found, truth, G.T, "flipped"), truth, src.apix) > 2 * nyquist


def test_search_against_the_true_map_recovers_poses(sim32):
    """With the right reference, the global grid + local refinement find the simulator's poses."""
    table, src, vol, images, ctf = _truth(sim32)
    cfg = SearchConfig(keep=4).resolved(src.D)
    search = PoseSearch(vol, cfg, 12, src.apix, torch.device("cpu"))
    n = 96
    res = search.run_batch(images[:n], ctf[:n], np.random.default_rng(0))
    err = rotation_angle(table.poses()[:n], res["poses"])
    shift_err = np.linalg.norm(res["shifts"] - table.shifts_px(src.apix)[:n], axis=1)
    assert np.median(err) < 8.0
    assert np.median(shift_err) < 0.6
    assert np.all(np.isfinite(res["confidence"])) and np.median(res["confidence"]) > 0


def test_soft_round_from_the_true_map_reconstructs_it(sim32):
    """The posterior-weighted per-rotation sums, inserted as slices, give back the map inside L."""
    from drgn_core.abinit.rounds import soft_reference
    from drgn_core.fsc import fsc_curve

    _table, src, vol, images, ctf = _truth(sim32)
    L = 8
    search = PoseSearch(vol, SearchConfig(base_rotations=2048).resolved(src.D), L, src.apix,
                        torch.device("cpu"))
    acc = SoftAccumulator(search.S.shape[0], search.lat.P, torch.device("cpu"))
    halves = np.arange(len(images)) % 2
    for a in range(0, len(images), 64):
        soft_batch(search, acc, images[a:a + 64], ctf[a:a + 64], halves[a:a + 64])
    ref, _ = soft_reference(*insert_slices(acc, search.grid, search.lat, src.D), src.apix)
    _, fsc = fsc_curve(ref, vol)
    assert fsc[1:L - 2].min() > 0.8


def test_refinement_gives_rotations_a_gradient():
    """Every particle's pose correction gets a gradient in rotation as well as in shift: the decoder's
    positional features were once computed without autograd, so the rotations never moved (only shifts)."""
    from types import SimpleNamespace

    from drgn_core.abinit.refine import step_loss
    from drgn_core.models import HetVAE, ModelConfig

    torch.manual_seed(0)
    model = HetVAE(ModelConfig(D=16, zdim=0))
    emb = torch.nn.Embedding(4, 5, sparse=True)
    torch.nn.init.zeros_(emb.weight)
    P = model.coords2d.shape[0]
    A = torch.as_tensor(Rotation.random(4, random_state=0).as_matrix(), dtype=torch.float32)
    batch = SimpleNamespace(pos=torch.arange(4), y=torch.randn(4, P, 2), ctf=torch.ones(4, P), A=A)
    loss, _, _ = step_loss(model, emb, batch, 0.0, True, None)
    loss.backward()
    g = emb.weight.grad.coalesce().to_dense()
    assert (g[:, :3].abs().sum(1) > 0).all() and (g[:, 3:].abs().sum(1) > 0).all()
    emb.weight.grad = None
    step_loss(model, emb, batch, 0.0, False, None)[0].backward()     # before pose_start: nothing moves
    assert emb.weight.grad is None


# The module's one ab initio run, heterogeneous (--zdim 2) so that the run-directory, resume, export and
# filter tests all check the encoder path too (the homogeneous --zdim 0 run is the workflow test's,
# tests/test_workflow_abinit.py).
HET = ["--zdim", "2", "--enc-dim", "32", "--enc-layers", "1", "--classes", "2", "--class-rounds", "2"]


@pytest.fixture(scope="module")
def tiny_run(sim32, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("abinit_run") / "run"
    drgn("abinit", str(sim32 / "table.star"), str(sim32 / "particles.mrcs"), "-o", str(run), *TINY, *HET)
    return run


def test_run_directory_is_a_training_run(tiny_run, tmp_path):
    import yaml

    from drgn_core.io.table import read_table

    for f in ("config.yaml", "model.pt", "z.npy", "indices.npy", "train_log.csv", "learning_curve.png",
              "poses.star", "confidence.npy", "confidence.png", "abinit.json", "search/map.mrc",
              "classes.npy"):
        assert (tiny_run / f).exists(), f
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["abinit"]["search"]["base_rotations"] == 576 and "arbitrary" in cfg["abinit"]["hand"]
    assert Path(cfg["inputs"]["table"]) == (tiny_run / "poses.star").resolve()
    poses = read_table(tiny_run / "poses.star")
    assert len(poses) == 160 and len(np.load(tiny_run / "confidence.npy")) == 160
    # --classes 2: every particle in one of the two classes, the sizes recorded in abinit.json
    classes = np.load(tiny_run / "classes.npy")
    assert classes.shape == (160,) and set(np.unique(classes)) <= {0, 1}
    summary = json.loads((tiny_run / "abinit.json").read_text())
    assert summary["class_sizes"] == np.bincount(classes, minlength=2).tolist()
    # --zdim > 0: the encoder is trained with the refined poses; z.npy holds one finite latent per row
    # and drgn volumes decodes at latent points (analyze/traverse read the same files)
    z = np.load(tiny_run / "z.npy")
    assert z.shape == (160, 2) and np.isfinite(z).all() and z.std(axis=0).min() > 0
    out = drgn("volumes", str(tiny_run), "-o", str(tmp_path / "vols"), "--z=0,0", "--flip")
    assert (tmp_path / "vols" / "vol_000.mrc").exists(), out.stdout


def test_resume_after_a_kill_equals_the_uninterrupted_run(tiny_run, sim32, tmp_path):
    """A run killed after its first search round (only config.yaml and that checkpoint left) resumes to
    the same poses and weights: mid-search, between two soft rounds, so the next reference must come
    from the checkpoint's decayed sums exactly as in the uninterrupted run."""
    from drgn_core.io.table import read_table

    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / "config.yaml", killed / "config.yaml")
    shutil.copy(tiny_run / "checkpoints" / "search_000.npz", killed / "checkpoints")
    drgn("abinit", str(sim32 / "table.star"), str(sim32 / "particles.mrcs"), "-o", str(killed), *TINY, *HET,
         "--resume")
    a, b = read_table(tiny_run / "poses.star"), read_table(killed / "poses.star")
    assert np.array_equal(a.poses(), b.poses()) and np.array_equal(a.shifts_A(), b.shifts_A())
    wa = torch.load(tiny_run / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(killed / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_mid_class_rounds_equals_the_uninterrupted_run(tiny_run, sim32, tmp_path):
    """Killed after the first of the two class rounds (search and first refinement complete), the run
    resumes from classes_000.npz and ends with the uninterrupted run's classes, poses and weights."""
    from drgn_core.io.table import read_table

    killed = tmp_path / "killed_classes"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / "config.yaml", killed / "config.yaml")
    ck = tiny_run / "checkpoints"
    for f in [*sorted(ck.glob("search_*.npz")), ck / "refine.pt", ck / "classes_000.npz"]:
        shutil.copy(f, killed / "checkpoints")
    out = drgn("abinit", str(sim32 / "table.star"), str(sim32 / "particles.mrcs"), "-o", str(killed), *TINY,
               *HET, "--resume")
    assert "resuming the class rounds after round 1/2" in out.stderr
    assert np.array_equal(np.load(tiny_run / "classes.npy"), np.load(killed / "classes.npy"))
    a, b = read_table(tiny_run / "poses.star"), read_table(killed / "poses.star")
    assert np.array_equal(a.poses(), b.poses()) and np.array_equal(a.shifts_A(), b.shifts_A())
    wa = torch.load(tiny_run / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(killed / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_class_rounds_sort_images_by_state(tmp_path):
    """Two compositional states with the true poses but 30 % of the images in the wrong class: the
    multi-class rounds (each class map back-projected from its members, every image searched against
    both) put almost every image with its own state, and keep its pose."""
    from drgn_core.abinit.classes import class_rounds
    from drgn_core.backproject import split_halves
    from drgn_core.data import open_particles, read_rows
    from drgn_core.io.table import read_table
    from drgn_core.simulate import SimConfig, run_simulation

    sim = tmp_path / "sim"
    run_simulation(SimConfig(n=240, D=32, snr=1.0, heterogeneity="compositional", n_states=2, seed=4), sim,
                   progress=False)
    table = read_table(sim / "table.star")
    src = open_particles(sim / "particles.mrcs", table)
    states = table.gt("drgnGtState").astype(np.int64)
    n, apix = len(table), src.apix
    wrong = np.random.default_rng(0).random(n) < 0.3
    start = {"labels": np.where(wrong, 1 - states, states), "poses": table.poses(),
             "shifts": table.shifts_px(apix)}
    cfg = SearchConfig(keep=2, classes=2, class_rounds=3, L_max=14).resolved(src.D)
    out = class_rounds(lambda p: read_rows(src, p), n, src.D, apix, table.ctf_params(apix),
                       split_halves(np.arange(n), None, 0), start, cfg, 0, tmp_path / "run",
                       torch.device("cpu"), progress=False, log=lambda s: None)
    # class ids stay those of the start (no relabelling), so the labels are compared as they are
    assert (out["labels"] == states).mean() > 0.95, (out["labels"] == states).mean()
    assert np.median(rotation_angle(table.poses(), out["poses"])) < 6.0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        f"classes_{r:03d}.npz" for r in range(3)]


def test_fresh_run_ignores_orphan_checkpoints(tiny_run, sim32, tmp_path):
    """A fresh run into a folder holding checkpoints but no config.yaml (a workflow rerun after its outputs
    were deleted) removes them instead of reading them: a damaged one would otherwise crash the run, and a
    foreign one would mix two runs. It then ends as the uninterrupted run does."""
    from drgn_core.io.table import read_table

    run = tmp_path / "rerun"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "search_000.npz").write_bytes(b"not a checkpoint")
    (run / "checkpoints" / "refine.pt").write_bytes(b"not a checkpoint either")
    drgn("abinit", str(sim32 / "table.star"), str(sim32 / "particles.mrcs"), "-o", str(run), *TINY, *HET)
    a, b = read_table(tiny_run / "poses.star"), read_table(run / "poses.star")
    assert np.array_equal(a.poses(), b.poses()) and np.array_equal(a.shifts_A(), b.shifts_A())


# --starts 2: soft rounds from two random streams, the more confident on a probe of 80 images continues
STARTS = ["--zdim", "0", "--starts", "2", "--probe", "80"]


@pytest.fixture(scope="module")
def starts_run(sim32, tmp_path_factory) -> tuple[Path, float, float]:
    """An uninterrupted --starts 2 run, with the seconds until its choice and until its end."""
    run = tmp_path_factory.mktemp("abinit_starts") / "run"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "drgn_core.cli", "abinit", str(sim32 / "table.star"),
                             str(sim32 / "particles.mrcs"), "-o", str(run), *TINY, *STARTS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t_choice = None
    while proc.poll() is None:
        if t_choice is None and (run / "checkpoints" / "starts.json").exists():
            t_choice = time.perf_counter() - t0
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    return run, t_choice, time.perf_counter() - t0


def test_starts_continue_the_most_confident_start(starts_run, sim32, tmp_path):
    """The choice is the start with the highest probe median confidence; it is recorded in starts.json
    and abinit.json; the run's soft rounds are that start's (start 0 is the run's own seed: with it chosen,
    they equal a one-start run's); of the other start only its last round (its map) is kept."""
    run, _, _ = starts_run
    rec = json.loads((run / "checkpoints" / "starts.json").read_text())
    conf = [s["median_confidence"] for s in rec["starts"]]
    assert len(conf) == 2 and rec["probe"] == 80 and rec["chosen"] == int(np.argmax(conf))
    assert conf[0] != conf[1] and rec["starts"][0]["seed"] == 0 and rec["starts"][1]["seed"] != 0
    assert json.loads((run / "abinit.json").read_text())["starts"] == rec
    other = 1 - rec["chosen"]
    ck = run / "checkpoints"
    assert not (ck / f"start_{rec['chosen']}").exists()
    assert sorted(p.name for p in (ck / f"start_{other}").iterdir()) == ["search_001.npz"]
    ref = np.load(ck / "search_001.npz")["reference"]
    assert not np.array_equal(ref, np.load(ck / f"start_{other}" / "search_001.npz")["reference"])
    one = tmp_path / "one"
    drgn("abinit", str(sim32 / "table.star"), str(sim32 / "particles.mrcs"), "-o", str(one), *TINY,
         "--zdim", "0", "--starts", "1")
    assert not (one / "checkpoints" / "starts.json").exists()
    same = np.array_equal(ref, np.load(one / "checkpoints" / "search_001.npz")["reference"])
    assert same == (rec["chosen"] == 0)


def test_starts_killed_at_random_moments_resume_to_the_uninterrupted_run(starts_run, sim32, tmp_path):
    """SIGKILL mid-start and at seeded random moments after the choice of start, each time rerun with
    --auto-resume: the run ends with the uninterrupted run's choice, poses and weights."""
    from drgn_core.abinit.rounds import round_path
    from drgn_core.io.table import read_table

    full, t_choice, t_total = starts_run
    cut = tmp_path / "cut"
    args = [sys.executable, "-m", "drgn_core.cli", "abinit", str(sim32 / "table.star"),
            str(sim32 / "particles.mrcs"), "-o", str(cut), *TINY, *STARTS, "--auto-resume"]
    # the first kill as soon as the second start has checkpointed its first round (before the choice),
    # the others at seeded random moments of what remains after the choice (a relaunch resumes there)
    first = round_path(cut, 0, 1)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not first.exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (cut / "checkpoints" / "starts.json").exists()
    before_choice = []
    for t in np.random.default_rng(20261208).uniform(0.2, 0.7, 2) * (t_total - t_choice):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=t)
        except subprocess.TimeoutExpired:
            before_choice.append(not (cut / "checkpoints" / "starts.json").exists())  # False: after
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert before_choice, f"no later kill landed before the run ended ({t_choice:.1f}, {t_total:.1f} s)"
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((cut / "checkpoints" / "starts.json").read_text()) == \
        json.loads((full / "checkpoints" / "starts.json").read_text())
    a, b = read_table(full / "poses.star"), read_table(cut / "poses.star")
    assert np.array_equal(a.poses(), b.poses()) and np.array_equal(a.shifts_A(), b.shifts_A())
    wa = torch.load(full / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(cut / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_run_from_before_starts_resumes_with_one_start(sim32, tmp_path):
    """A run whose config.yaml predates --starts (no `starts` key) and was killed mid-search resumes as
    the one-start search it was, not as a 4-start one: the same poses as an uninterrupted --starts 1 run."""
    import yaml

    from drgn_core.io.table import read_table

    one = tmp_path / "one"
    drgn("abinit", str(sim32 / "table.star"), str(sim32 / "particles.mrcs"), "-o", str(one), *TINY,
         "--zdim", "0", "--starts", "1")
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    cfg = yaml.safe_load((one / "config.yaml").read_text())
    del cfg["abinit"]["search"]["starts"], cfg["abinit"]["search"]["probe"]
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    shutil.copy(one / "checkpoints" / "search_000.npz", old / "checkpoints")
    drgn("abinit", str(sim32 / "table.star"), str(sim32 / "particles.mrcs"), "-o", str(old), *TINY,
         "--zdim", "0", "--resume")
    assert not (old / "checkpoints" / "starts.json").exists()
    a, b = read_table(one / "poses.star"), read_table(old / "poses.star")
    assert np.array_equal(a.poses(), b.poses()) and np.array_equal(a.shifts_A(), b.shifts_A())


def test_export_round_trip_and_flip_hand(tiny_run, tmp_path):
    """Exported STAR → re-imported → back-projected equals the back-projection of the run's poses; the
    hand-flipped export back-projects to the mirror image."""
    from drgn_core.backproject import backproject_table
    from drgn_core.fsc import fsc_curve
    from drgn_core.importing import import_particles
    from drgn_core.io.table import read_table
    from drgn_core.volumes import flip_hand

    drgn("export", str(tiny_run / "poses.star"), "--ind", str(tiny_run / "indices.npy"), "-o",
         str(tmp_path / "exp"), "--name", "abinit")
    drgn("export", str(tiny_run / "poses.star"), "--ind", str(tiny_run / "indices.npy"), "-o",
         str(tmp_path / "flip"), "--name", "abinit", "--flip-hand")
    run_map = backproject_table(read_table(tiny_run / "poses.star"), progress=False).map
    back = backproject_table(import_particles(tmp_path / "exp" / "abinit.star"), progress=False).map
    flipped = backproject_table(import_particles(tmp_path / "flip" / "abinit.star"), progress=False).map
    D = run_map.shape[0]
    assert fsc_curve(run_map, back)[1][1:D // 2 - 1].min() > 0.99
    assert fsc_curve(flip_hand(run_map), flipped)[1][1:D // 4].min() > 0.95
    cs = import_particles(tmp_path / "exp" / "abinit.cs")
    assert np.allclose(cs.poses(), read_table(tiny_run / "poses.star").poses(), atol=1e-4)


def test_bad_options_and_tables_without_poses(sim32, tmp_path):
    out = drgn("abinit", str(sim32 / "table.star"), str(sim32 / "particles.mrcs"), "-o", str(tmp_path / "r"),
               "--L-min", "0", check=False)
    assert out.returncode == 2 and "--L-min must be >= 1" in out.stderr and not (tmp_path / "r").exists()
    for extra, message in ((["--classes", "1"], "--classes must be 0 (off) or at least 2, got 1"),
                           (["--classes", "3"], "--classes 3 needs a heterogeneous run (--zdim > 0)")):
        out = drgn("abinit", str(sim32 / "table.star"), str(sim32 / "particles.mrcs"), "-o",
                   str(tmp_path / "r"), *extra, check=False)
        assert out.returncode == 2 and message in out.stderr and not (tmp_path / "r").exists(), out.stderr
    # a STAR without poses: the import hint points at drgn abinit, and --no-poses imports it
    from drgn_core.io.star_format import read_star_blocks, write_star

    blocks = read_star_blocks(sim32 / "particles.star")
    blocks["particles"] = blocks["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    noposes = sim32 / "noposes.star"
    write_star(blocks, noposes)
    out = drgn("import", str(noposes), "-o", str(tmp_path / "t.star"), check=False)
    assert out.returncode == 2 and "drgn abinit" in out.stderr and "--no-poses" in out.stderr
    drgn("import", str(noposes), "-o", str(tmp_path / "t.star"), "--no-poses")
    from drgn_core.io.table import read_table

    t = read_table(tmp_path / "t.star")
    assert np.allclose(t.poses(), np.eye(3)) and t.provenance.get("poses") == "none"


# The search from scratch (poses and the refined map against the truth) is tests/test_abinit_accuracy.py's.


def test_confidence_filter_removes_the_least_confident_particles(tiny_run, tmp_path):
    """abinit_confidence {min}: the particles below `min` are removed; the abinit run is found through the
    filtered run's table (here the abinit run itself, whose config.yaml names its poses.star) or given."""
    import yaml

    conf = np.load(tiny_run / "confidence.npy")
    cut = float(np.median(conf))
    expect = np.flatnonzero(conf >= cut)          # tiny_run's indices.npy is every row, in order
    for i, params in enumerate(({"min": cut}, {"min": cut, "run": str(tiny_run)})):
        spec = tmp_path / f"spec{i}.yaml"
        spec.write_text(yaml.safe_dump([{"run": str(tiny_run), "filters": [{"abinit_confidence": params}]}]))
        drgn("filter", "--spec", str(spec), "-o", str(tmp_path / f"f{i}"))
        assert np.array_equal(np.load(tmp_path / f"f{i}" / "kept.npy"), expect)
    # a run directory without confidences: a one-line error naming the file
    spec = tmp_path / "bad.yaml"
    bad = {"abinit_confidence": {"min": 1.0, "run": str(tmp_path)}}
    spec.write_text(yaml.safe_dump([{"run": str(tiny_run), "filters": [bad]}]))
    out = drgn("filter", "--spec", str(spec), "-o", str(tmp_path / "bad"), check=False)
    assert out.returncode == 2 and "indices.npy" in out.stderr and not (tmp_path / "bad").exists()
