"""The outlier rules remove nothing when nothing is an outlier (issue 22): every example's filter, applied
to a pilot trained on a simulated set WITHOUT junk, keeps >= 99 % of the particles (that each still finds
the junk is tested in tests/test_junk_filter.py, on its pilots).

Before the separation test, "the GMM component with the largest mean ‖z‖" removed a fifth of a junk-free
entry: a mixture always has a component of largest mean ‖z‖."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from drgn_core.cli import main
from drgn_core.filtering import ashman_d, shell_cut

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CONFIGS = [*sorted((REPO / "config" / "examples").glob("*.yaml")), REPO / "config" / "config.yaml"]


def example_spec(config: Path, runs: dict[int, Path]) -> dict:
    """The config's filter section as a `drgn filter` spec on our pilots (by zdim)."""
    f = yaml.safe_load(config.read_text())["filter"]
    return {"combine": f.get("combine", "intersection"),
            "runs": [{"run": str(runs[p["zdim"]]), "filters": p["filters"]} for p in f["pilots"]]}


@pytest.fixture(scope="module")
def clean_pilots(tmp_path_factory):
    from test_junk_filter import simulate_pilots  # the junk test's pilots (imported here: it imports us)

    # every example filters its 10-D pilot only
    return simulate_pilots(tmp_path_factory.mktemp("clean"), 0, 4, (10,))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_example_filters_keep_a_set_without_junk(config, clean_pilots, tmp_path):
    _, runs = clean_pilots
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(example_spec(config, runs)))
    out = tmp_path / "f"
    assert main(["filter", "--spec", str(tmp_path / "spec.yaml"), "-o", str(out)]) == 0
    kept = np.load(out / "kept.npy")
    report = json.loads((out / "filter.json").read_text())
    assert len(kept) >= 0.99 * 1200, json.dumps(report["runs"], indent=1)[:3000]
    for run in report["runs"]:  # the figures behind each decision are in the summary
        for f in run["filters"]:
            if f["filter"] == "gmm":
                assert f["separation_threshold"] == 2.0 and "best_separation" in f


def test_shell_cut_on_known_distributions():
    """Analytic cases: two unit Gaussians 5σ apart (D = 5) are cut; 1σ apart (D = 1) are not; the most
    populous group is never removed; threshold 0 removes every candidate."""
    rng = np.random.default_rng(0)
    core = rng.normal(10.0, 1.0, 20000)
    far, near = rng.normal(15.0, 1.0, 2000), rng.normal(11.0, 1.0, 2000)
    assert ashman_d(far, core) == pytest.approx(5.0, abs=0.1)
    assert ashman_d(near, core) == pytest.approx(1.0, abs=0.1)
    labels = np.repeat([0, 1], [20000, 2000])
    assert shell_cut(np.concatenate([core, far]), labels, 2, {1}, 2.0)[0] == [1]
    removed, info = shell_cut(np.concatenate([core, near]), labels, 2, {1}, 2.0)
    assert removed == [] and info["best_separation"] == pytest.approx(1.0, abs=0.1)
    assert shell_cut(np.concatenate([core, near]), labels, 2, {1}, 0.0)[0] == [1]
    assert shell_cut(np.concatenate([core, far]), 1 - labels, 2, {0, 1}, 2.0)[0] == [0]  # 0 is now small
    assert shell_cut(np.concatenate([far, core]), np.repeat([0, 1], [2000, 20000]), 2, {1}, 2.0)[0] == []
