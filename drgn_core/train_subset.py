"""Train on a seeded random subset of the particles, then encode every particle (`--train-subset N|F`).

Why. The decoder costs far more than the encoder (a forward pass of the 256×3 decoder per Fourier point of
every image, against one pass of the encoder per image), and an epoch's cost is proportional to the images
it visits. Training on a subset of the rows and then encoding all of them with the trained encoder puts
every particle into z.npy at the cost of training on fewer. It works only where the encoder generalises
to images it never saw, which needs enough training images: bench/README.md ("Learning-rate schedule,
batch scaling, training subset") gives the subset sizes at which the held-out rows' latent orders the
data as well as the trained rows'.

The subset is drawn from the training positions (those left after the --val-frac split), by a generator
seeded with the run's seed, so a run and its resume, and two runs with the same seed, train on the same
rows. The run directory records them in train_indices.npy (canonical table rows, docs/architecture.md
§ Learning-rate schedule and training subset).
"""

from __future__ import annotations

import numpy as np

from drgn_core.errors import DrgnError

SUBSET_STREAM = 0x5B5E7  # the generator stream of the subset draw (distinct from the validation split's)


def subset_size(spec: float, pool: int) -> int:
    """How many rows `spec` asks for out of `pool`: a count (>= 1) or a fraction in (0, 1)."""
    if spec >= 1:
        if spec != int(spec):
            raise DrgnError(f"--train-subset: a count must be a whole number, got {spec}")
        n = int(spec)
    elif spec > 0:
        n = max(1, round(spec * pool))
    else:
        raise DrgnError(f"--train-subset must be a count >= 1 or a fraction in (0, 1), got {spec}")
    if n > pool:
        raise DrgnError(f"--train-subset {int(spec)} is more than the {pool} particles left to train on")
    return n


def choose_train_subset(train_pos: np.ndarray, spec: float, seed: int) -> np.ndarray:
    """The sorted positions (a subset of `train_pos`) to train on; `spec` 0 keeps them all."""
    if not spec:
        return train_pos
    n = subset_size(spec, len(train_pos))
    pick = np.random.default_rng([seed, SUBSET_STREAM]).choice(len(train_pos), size=n, replace=False)
    return np.sort(np.asarray(train_pos)[pick])


def parse_subset(text: str) -> float:
    """--train-subset's value: a whole number (a count) or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a count (e.g. 5000) or a fraction (e.g. 0.25), got {text!r}") from None
    if not (value >= 1 and value == int(value)) and not 0 < value < 1:
        raise ValueError(f"expected a count >= 1 or a fraction in (0, 1), got {text!r}")
    return int(value) if value >= 1 else value
