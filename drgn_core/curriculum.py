"""The resolution curriculum of `drgn train --curriculum`: which Fourier radius each epoch trains inside.

    --curriculum 8:3,12:3        radius 8 px for 3 epochs, then 12 px for 3, then the full circle
    --curriculum 0.25:4          a quarter of the box (D/4, a D/2 crop) for 4 epochs, then the full circle

Why. The decoder (the 256×3 MLP evaluated at every pixel of every image) is where training's FLOPs go, and
the number of pixels inside a Fourier radius r grows as r². An epoch inside r = D/4 evaluates the decoder
at about a quarter of the points of a full one (docs/architecture.md § Resolution curriculum). The latent's
ordering is mostly decided at low resolution, so the early epochs, which mostly find that ordering, can be
spent there.

A radius is a whole number of Fourier pixels of the training box (|k|·D < r), or a fraction of the box
written with a point (0.25 → round(0.25·D)), so that one schedule fits every box size of the workflow.
The phases are a function of the epoch only, so a run resumed mid-curriculum trains the same radii. After
the last phase training goes on over the full circle (r = D/2) until --epochs; at least one full-radius
epoch must remain, so that the final model has been trained on everything it will be asked for.
"""

from __future__ import annotations

from drgn_core.errors import DrgnError


def parse_curriculum(spec: str) -> list[tuple[float, int]]:
    """'R:E,R:E,...' → [(radius, epochs), ...]; radius a whole number of pixels or a fraction (< 1) of D.

    '' means no curriculum. Raises DrgnError naming the faulty phase.
    """
    spec = (spec or "").strip()
    if not spec:
        return []
    phases = []
    for part in spec.split(","):
        text = part.strip()
        r_text, sep, e_text = text.partition(":")
        try:
            if not sep:
                raise ValueError
            radius = float(r_text) if "." in r_text else int(r_text)
            epochs = int(e_text)
        except ValueError:
            raise DrgnError(f"--curriculum: phase {text!r} is not RADIUS:EPOCHS (e.g. 8:3 or 0.25:3)"
                            ) from None
        if epochs < 1:
            raise DrgnError(f"--curriculum: phase {text!r} needs at least 1 epoch")
        if isinstance(radius, float) and not 0.0 < radius < 0.5:
            raise DrgnError(f"--curriculum: phase {text!r}: a fractional radius must lie in (0, 0.5) of the "
                            "box")
        if isinstance(radius, int) and radius < 1:
            raise DrgnError(f"--curriculum: phase {text!r}: the radius must be >= 1 px")
        phases.append((radius, epochs))
    return phases


def resolve_curriculum(spec: str, D: int, epochs: int) -> list[tuple[int, int]]:
    """The phases of `spec` in whole pixels of a D-pixel box, checked against the run's epochs.

    Radii must be at most D/2 (the full circle) and must not shrink from one phase to the next; the
    phases must leave at least one full-radius epoch of `epochs`.
    """
    out: list[tuple[int, int]] = []
    for radius, n in parse_curriculum(spec):
        r = max(1, round(radius * D)) if isinstance(radius, float) else int(radius)
        if r > D // 2:
            raise DrgnError(f"--curriculum: radius {r} px exceeds the images' Nyquist radius D/2 = {D // 2}")
        if out and r < out[-1][0]:
            raise DrgnError(f"--curriculum: radius {r} px after {out[-1][0]} px; the radius may only grow")
        out.append((r, n))
    total = sum(n for _, n in out)
    if out and total >= epochs:
        raise DrgnError(f"--curriculum: its phases take {total} epochs of the {epochs} to train, leaving no "
                        "epoch over the full circle; raise --epochs or shorten the curriculum")
    return out


def curriculum_epochs(phases: list[tuple[int, int]]) -> int:
    """Epochs the curriculum's restricted phases take (the full-circle training follows them)."""
    return sum(n for _, n in phases)


def radius_at(phases: list[tuple[int, int]], D: int, epoch: int) -> int:
    """The Fourier radius (px) epoch `epoch` (0-based) trains inside: its phase's, or D/2 after them."""
    end = 0
    for r, n in phases:
        end += n
        if epoch < end:
            return r
    return D // 2
