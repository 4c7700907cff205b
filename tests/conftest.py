"""Shared test settings: a headless plotting backend, a small thread count, and the conventions fixture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
CONVENTIONS = ROOT / "tests" / "data" / "conventions"


@pytest.fixture(scope="session")
def conventions_dir() -> Path:
    """The independent conventions fixture, shipped in tests/data/conventions (see its README)."""
    return CONVENTIONS


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
