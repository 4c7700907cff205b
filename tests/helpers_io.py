"""Small builders for the I/O tests: hand-written STAR text, tiny MRC stacks, the conventions fixture.

STAR files are written here as plain text, not with drgn_core's writer, so reader tests do not trust the
code under test to produce their input.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np

#: The independent conventions fixture, shipped with the tests (tests/data/conventions/README.md).
FIXTURE = Path(__file__).resolve().parent / "data" / "conventions"

FIXTURE_TABLES = ["particles_relion31.star", "particles_relion30.star", "particles.cs", "particles_csdat.cs"]


def write_stack(path: Path, images: np.ndarray, apix: float = 1.0, mode_dtype=np.float32) -> Path:
    """An MRC image stack with the given data type (mrcfile picks the mode from it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as m:
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN test data makes mrcfile's statistics warn
        m.set_data(np.ascontiguousarray(images, dtype=mode_dtype))
        m.set_image_stack()
        m.voxel_size = apix
    return path


def star_text(particles: dict[str, list], optics: dict[str, list] | None = None) -> str:
    """RELION STAR text: 3.1 layout when `optics` is given, else a single RELION 3.0 block."""
    def loop(name: str, cols: dict[str, list]) -> str:
        head = "".join(f"_{c} #{i + 1}\n" for i, c in enumerate(cols))
        rows = "".join(" ".join(str(v) for v in row) + "\n" for row in zip(*cols.values()))
        return f"\ndata_{name}\n\nloop_\n{head}{rows}\n"
    text = "# version 30001\n"
    if optics is not None:
        text += loop("optics", optics) + "# version 30001\n" + loop("particles", particles)
    else:
        text += loop("", particles)
    return text


def default_optics(box: int = 8, apix: float = 2.0, groups: int = 1) -> dict[str, list]:
    return {"rlnOpticsGroupName": [f"og{g}" for g in range(1, groups + 1)],
            "rlnOpticsGroup": list(range(1, groups + 1)),
            "rlnVoltage": [300.0] * groups, "rlnSphericalAberration": [2.7] * groups,
            "rlnAmplitudeContrast": [0.1] * groups, "rlnImagePixelSize": [apix] * groups,
            "rlnImageSize": [box] * groups, "rlnImageDimensionality": [2] * groups}


def default_particles(names: list[str], rng: np.random.Generator, groups: int = 1) -> dict[str, list]:
    n = len(names)
    return {"rlnImageName": names,
            "rlnAngleRot": rng.uniform(-180, 180, n).round(4).tolist(),
            "rlnAngleTilt": rng.uniform(0, 180, n).round(4).tolist(),
            "rlnAnglePsi": rng.uniform(-180, 180, n).round(4).tolist(),
            "rlnOriginXAngst": rng.uniform(-3, 3, n).round(4).tolist(),
            "rlnOriginYAngst": rng.uniform(-3, 3, n).round(4).tolist(),
            "rlnDefocusU": rng.uniform(1e4, 2e4, n).round(2).tolist(),
            "rlnDefocusV": rng.uniform(1e4, 2e4, n).round(2).tolist(),
            "rlnDefocusAngle": rng.uniform(0, 180, n).round(3).tolist(),
            "rlnOpticsGroup": [1 + i % groups for i in range(n)]}


def small_dataset(root: Path, box: int = 8, counts: tuple[int, ...] = (4, 3), apix: float = 2.0,
                  seed: int = 0, shape: tuple[int, int] | None = None) -> tuple[Path, np.ndarray]:
    """A RELION 3.1 STAR over stacks s0.mrcs, s1.mrcs … holding `counts` images each (random data).

    Returns the STAR path and the images in table order.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape or (box, box)
    names, images = [], []
    for k, c in enumerate(counts):
        data = rng.normal(size=(c, ny, nx)).astype(np.float32)
        write_stack(root / "stacks" / f"s{k}.mrcs", data, apix)
        names += [f"{i + 1:06d}@stacks/s{k}.mrcs" for i in range(c)]
        images.append(data)
    star = root / "particles.star"
    star.write_text(star_text(default_particles(names, rng), default_optics(nx, apix)))
    return star, np.concatenate(images)
