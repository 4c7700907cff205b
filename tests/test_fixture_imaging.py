"""Fixture check 3: our projector, shift and CTF reproduce an independent image-formation code's images.

The conventions fixture (tests/data/conventions, see its README) was made by code that shares
nothing with ours. Poses, origins and CTF parameters are read straight from its truth.npz, so this test
pins the image formation alone, independently of the STAR/.cs importers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from drgn_core.ctf import CTF_COLUMNS
from drgn_core.io.mrc import read_mrc
from drgn_core.projection import prepare_volume_ft, render_images


def _load(conventions_dir: Path):
    truth = np.load(conventions_dir / "truth.npz", allow_pickle=False)
    vol, apix = read_mrc(conventions_dir / "volume.mrc", mmap=False)
    n = len(truth["A"])
    params = np.column_stack([
        np.full(n, float(truth["apix"])), truth["defocus_u"], truth["defocus_v"], truth["defocus_angle_deg"],
        truth["voltage_kv"], truth["cs_mm"], truth["amp_contrast"], truth["phase_shift_deg"], np.zeros(n),
    ])
    assert params.shape[1] == len(CTF_COLUMNS)
    origin_px = truth["origin_A"] / float(truth["apix"])
    return truth, vol.astype(np.float64), apix, params, origin_px


def _per_image_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def test_projector_and_ctf_reproduce_clean_images(conventions_dir):
    truth, vol, apix, params, origin_px = _load(conventions_dir)
    assert apix == pytest.approx(float(truth["apix"]))
    clean, _ = read_mrc(conventions_dir / "clean.mrcs", mmap=False)
    ours = render_images(prepare_volume_ft(vol), truth["A"], origin_px, params)
    cc = _per_image_corr(ours, clean)
    assert cc.min() >= 0.99, f"worst image {cc.argmin()}: {cc.min():.4f}"
    # and the scale matches too (same unnormalised DFT convention): a wrong sign or factor would show here
    assert np.abs(ours - clean).max() < 1e-3 * np.abs(clean).max()


def test_projector_reproduces_projections_without_ctf(conventions_dir):
    truth, vol, _, _, origin_px = _load(conventions_dir)
    proj, _ = read_mrc(conventions_dir / "projections.mrcs", mmap=False)
    ours = render_images(vol, truth["A"], origin_px, None)
    cc = _per_image_corr(ours, proj)
    assert cc.min() >= 0.99, f"worst image {cc.argmin()}: {cc.min():.4f}"
    assert np.abs(ours - proj).max() < 1e-3 * np.abs(proj).max()


def test_wrong_conventions_would_be_caught(conventions_dir):
    """The fixture discriminates: Aᵀ instead of A, or the origin's sign flipped, break the match."""
    truth, vol, _, _, origin_px = _load(conventions_dir)
    proj, _ = read_mrc(conventions_dir / "projections.mrcs", mmap=False)
    k = slice(0, 40)
    vft = prepare_volume_ft(vol)
    transposed = render_images(vft, truth["A"][k].transpose(0, 2, 1), origin_px[k], None)
    assert np.median(_per_image_corr(transposed, proj[k])) < 0.9
    flipped = render_images(vft, truth["A"][k], -origin_px[k], None)
    assert np.median(_per_image_corr(flipped, proj[k])) < 0.95
