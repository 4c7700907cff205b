"""`drgn landscape` against ground truth: states of a compositional set, volume PC1 of a continuous one,
index files that partition the particles and name original rows, state exports, and one-line errors.

The runs' decoders are fitted to the true maps (tests/conftest_landscape.py), so the landscape sees the
simulated structures and every expected answer is known.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest_landscape import compositional_maps, corr, fitted_run, hinge_maps
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score

from drgn_core.cli import main
from drgn_core.importing import import_particles
from drgn_core.io.indices import read_index_file
from drgn_core.io.mrc import read_mrc, write_mrc
from drgn_core.io.table import write_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURE = Path(__file__).resolve().parent / "data" / "conventions"
D = 24
N = 400  # the conventions fixture's particles, so states can be exported to its .cs and .star
CENTRES = np.array([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]])


@pytest.fixture(scope="module")
def comp(tmp_path_factory) -> dict:
    """A compositional run: 400 particles in three classes (populations .2/.3/.5), 2-D latents around one
    centre per class, a decoder fitted to the three true maps; and its landscape (60 maps, 3 states)."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("landscape_comp")
    rng = np.random.default_rng(0)
    classes = rng.choice(3, size=N, p=[0.2, 0.3, 0.5])
    z = CENTRES[classes] + 0.15 * rng.normal(size=(N, 2))
    pts_class = np.repeat(np.arange(3), 30)
    pts = CENTRES[pts_class] + 0.25 * rng.normal(size=(90, 2))
    run = fitted_run(root / "run", pts, compositional_maps(D), pts_class, z)
    out = root / "landscape"
    assert main(["landscape", str(run), "-o", str(out), "--maps", "60", "--states", "3", "--pcs", "10",
                 "--device", "cpu"]) == 0
    return {"root": root, "run": run, "out": out, "classes": classes, "z": z}


def test_compositional_states_match_the_true_classes_and_their_maps(comp):
    out, classes = comp["out"], comp["classes"]
    states = np.load(out / "particle_states.npy")
    assert adjusted_rand_score(classes, states) >= 0.9
    truth = compositional_maps(D)
    for s in range(3):
        mean, apix = read_mrc(out / "states" / f"state_{s}" / "mean.mrc", mmap=False)
        assert apix == pytest.approx(4.0)
        c = [corr(mean, t) for t in truth]
        majority = np.bincount(classes[states == s], minlength=3).argmax()
        assert int(np.argmax(c)) == majority, (s, c)
        spread, _ = read_mrc(out / "states" / f"state_{s}" / "spread.mrc", mmap=False)
        assert spread.min() >= 0 and spread.max() < 0.5 * mean.max()  # one structure per state
    s = json.loads((out / "summary.json").read_text())
    assert s["states"]["counts"] == np.bincount(states, minlength=3).tolist()
    assert s["n_maps"] <= 60 and len(list((out / "maps").glob("vol_*.mrc"))) == s["n_maps"]
    assert s["regressor"]["r2_per_pc"][0] > 0.9        # held-out maps: z → volume PC1 is learned
    mask, _ = read_mrc(out / "mask.mrc", mmap=False)
    assert set(np.unique(mask)) == {0.0, 1.0}
    # the mask holds every true structure's half-max voxels
    assert all(mask[t > 0.5 * t.max()].all() for t in truth)
    for name in ("vol_pca_maps_states.png", "vol_pca_particles_states.png", "states_umap.png",
                 "state_sizes.png", "states/means.png", "maps/maps.png", "vol_pc1/maps.png"):
        assert (out / name).stat().st_size > 1000, name


def test_state_index_files_partition_the_particles_and_export_to_cs_and_star(comp, tmp_path):
    from cryosparc.dataset import Dataset

    out = comp["out"]
    states = np.load(out / "particle_states.npy")
    parts = [read_index_file(out / "states" / f"state_{s}" / "indices.npy", N) for s in range(3)]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(N))     # disjoint and complete
    for s, p in enumerate(parts):
        assert np.array_equal(p, np.nonzero(states == s)[0])

    data = tmp_path / "data"
    data.mkdir()
    for name in ("particles.cs", "particles_relion31.star"):
        shutil.copy(FIXTURE / name, data / name)
    shutil.copytree(FIXTURE / "stacks", data / "stacks")
    source = Dataset.load(data / "particles.cs")
    for name in ("particles.cs", "particles_relion31.star"):
        table = tmp_path / f"{Path(name).stem}.table.star"
        write_table(import_particles(data / name), table)
        k = 1
        exp = tmp_path / f"export_{Path(name).stem}"
        assert main(["export", str(table), "--landscape", str(out), "--state", str(k), "-o", str(exp)]) == 0
        assert np.array_equal(np.sort(np.load(exp / "indices.npy")), parts[k])
        if name.endswith(".cs"):
            sub = Dataset.load(exp / "state_1.cs")
            want = np.sort(np.asarray(source["uid"])[parts[k]])
            assert np.array_equal(np.sort(np.asarray(sub["uid"])), want)
            assert (exp / "state_1.csg").exists()
            uids = np.loadtxt(exp / "uids.txt", dtype=np.uint64)
            assert np.array_equal(np.sort(uids), np.sort(np.asarray(source["uid"], np.uint64)[parts[k]]))
        else:
            rows = [ln for ln in (exp / "state_1.star").read_text().splitlines() if "@" in ln]
            assert len(rows) == len(parts[k])


def test_a_run_trained_with_ind_names_original_table_rows(comp, tmp_path):
    rng = np.random.default_rng(3)
    ind = np.sort(rng.choice(N, 250, replace=False))
    run = tmp_path / "run_ind"
    run.mkdir()
    shutil.copy(comp["run"] / "model.pt", run / "model.pt")
    np.save(run / "z.npy", comp["z"][ind].astype(np.float32))
    np.save(run / "indices.npy", ind)
    out = tmp_path / "landscape"
    assert main(["landscape", str(run), "-o", str(out), "--maps", "40", "--states", "3", "--pcs", "5",
                 "--cluster", "gmm", "--device", "cpu"]) == 0
    parts = [read_index_file(out / "states" / f"state_{s}" / "indices.npy", N) for s in range(3)]
    assert np.array_equal(np.sort(np.concatenate(parts)), ind)             # original rows, all of them
    label = np.full(N, -1)
    for s, p in enumerate(parts):
        label[p] = s
    assert adjusted_rand_score(comp["classes"][ind], label[ind]) >= 0.9
    centres = read_index_file(out / "maps" / "centers_ind.npy", N)
    assert np.isin(centres, ind).all()


def test_continuous_volume_pc1_orders_the_motion(tmp_path):
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    grid = (np.arange(20) + 0.5) / 20
    coord = rng.uniform(0, 1, 300)
    z = (3.0 * (coord - 0.5) + 0.05 * rng.normal(size=300))[:, None]
    run = fitted_run(tmp_path / "run", 3.0 * (grid[:, None] - 0.5), hinge_maps(D, grid), np.arange(20), z)
    out = tmp_path / "landscape"
    assert main(["landscape", str(run), "-o", str(out), "--maps", "40", "--states", "4", "--pcs", "8",
                 "--device", "cpu"]) == 0
    pcs = np.load(out / "particle_vol_pca.npy")
    assert abs(spearmanr(pcs[:, 0], coord)[0]) >= 0.9
    maps_pc1 = np.load(out / "vol_pca.npy")[:, 0]
    centres = read_index_file(out / "maps" / "centers_ind.npy", 300)
    assert abs(spearmanr(maps_pc1, coord[centres])[0]) >= 0.9
    # states are numbered along volume PC1, so along the motion: mean coordinate monotonic in state
    states = np.load(out / "particle_states.npy")
    means = [coord[states == s].mean() for s in range(4)]
    assert np.all(np.diff(means) > 0) or np.all(np.diff(means) < 0)


def one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_get_one_line_errors_and_no_output(comp, tmp_path, capsys):
    run, out = comp["run"], tmp_path / "out"
    mask = tmp_path / "mask32.mrc"
    write_mrc(mask, np.ones((32, 32, 32), np.float32), 4.0)
    err = one_line_error(["landscape", str(run), "-o", str(out), "--maps", "10", "--states", "2",
                          "--mask", str(mask), "--device", "cpu"], capsys)
    assert err == (f"drgn landscape: error: {mask}: mask has shape (32, 32, 32) but the maps are decoded at "
                   "box 24 (give -D 32 or a mask of box 24)")
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    for f in ("z.npy", "indices.npy"):
        shutil.copy(run / f, no_model / f)
    err = one_line_error(["landscape", str(no_model), "-o", str(out)], capsys)
    assert err.startswith(f"drgn landscape: error: {no_model / 'model.pt'}: the run has no model.pt")
    err = one_line_error(["landscape", str(run), "-o", str(out), "--maps", "5", "--states", "8",
                          "--device", "cpu"], capsys)
    assert err == ("drgn landscape: error: --states 8 is more than the 5 maps of the landscape (give fewer "
                   "states or more --maps)")
    err = one_line_error(["export", str(tmp_path / "t.star"), "--landscape", str(comp["out"]), "--state", "7",
                          "-o", str(out)], capsys)
    assert "--state 7 does not exist: the landscape has states 0 … 2" in err
    assert not out.exists()


def test_summary_shows_a_state_table(comp, tmp_path):
    out = comp["out"]
    assert main(["summarize", "--landscape", str(out), "-o", str(tmp_path / "s.json"), "--html",
                 str(tmp_path / "s.html")]) == 0
    ls = json.loads((tmp_path / "s.json").read_text())["landscape"]
    counts = np.bincount(np.load(out / "particle_states.npy"), minlength=3)
    assert [r["particles"] for r in ls["states"]] == counts.tolist()
    assert [r["percent"] for r in ls["states"]] == [round(100 * c / N, 1) for c in counts]
    assert ls["maps"] == json.loads((out / "summary.json").read_text())["n_maps"]
    page = (tmp_path / "s.html").read_text()
    assert "<td>states/state_2/indices.npy</td>" in page and "<h2>Landscape states" in page
