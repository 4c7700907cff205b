"""The default configuration's accuracy, end to end: the shipped config/config.yaml on its simulated
demo data (3,000 particles with 15 % junk, a continuous hinge) must give what the README promises —
junk-filter F1 >= 0.9 and high-res |Spearman rho| >= 0.85 between the latent's first principal axis and
the true reaction coordinate.

The workflow run is the session fixture `default_workflow` (tests/conftest.py), shared with the SLURM
test: on SLURM where a cluster can be brought up, locally otherwise, so this check never skips.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_default_config_filter_f1_and_spearman(default_workflow):
    results = default_workflow["workdir"] / "results"
    summary = json.loads((results / "report" / "summary.json").read_text())
    headline = summary["headline"]
    assert headline["junk filter F1"] >= 0.9, headline
    assert headline["|Spearman \u03c1|, highres/train"] >= 0.85, headline
    # the headline is the metrics files' numbers, not a copy that could drift
    filt = json.loads((results / "filter" / "filter.json").read_text())["ground_truth"]
    metrics = json.loads((results / "validation" / "metrics.json").read_text())
    assert filt["f1"] == pytest.approx(headline["junk filter F1"], abs=1e-3)
    rho = headline["|Spearman \u03c1|, highres/train"]
    assert metrics["spearman"]["value"] == pytest.approx(rho, abs=1e-3)
    assert summary["particles"]["input"] == default_workflow["config"]["simulate"]["n"]
