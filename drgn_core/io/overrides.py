"""Values the user supplies on the command line for optics and CTF numbers a particle file lacks or gets
wrong (``drgn import --apix --kv --cs --amp-contrast --phase-shift``).

Real tables miss columns (a RELION 3.0 STAR without ``rlnAmplitudeContrast``, a `.cs` without
``ctf/amp_contrast``) or carry wrong ones (a pixel size from a mis-set magnification). The readers take the
overrides as one mapping from the canonical table's column to a value, and every message about a missing
value names the option that would supply it, so the user's next step is in the error itself.
"""

from __future__ import annotations

# Canonical column → the `drgn import` option that supplies it (and the workflow's `input:` key).
OVERRIDE_OPTIONS: dict[str, str] = {
    "rlnImagePixelSize": "--apix",
    "rlnVoltage": "--kv",
    "rlnSphericalAberration": "--cs",
    "rlnAmplitudeContrast": "--amp-contrast",
    "rlnPhaseShift": "--phase-shift",
}
# What each value is, for messages and --help.
OVERRIDE_MEANING: dict[str, str] = {
    "rlnImagePixelSize": "pixel size in Å",
    "rlnVoltage": "acceleration voltage in kV",
    "rlnSphericalAberration": "spherical aberration Cs in mm",
    "rlnAmplitudeContrast": "amplitude contrast (fraction, e.g. 0.1)",
    "rlnPhaseShift": "phase shift in degrees (phase plate data)",
}
# Optics-group-level columns among them (the phase shift is per particle).
OPTICS_OVERRIDES = ["rlnImagePixelSize", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]


def make_overrides(apix: float | None = None, kv: float | None = None, cs: float | None = None,
                   amp_contrast: float | None = None, phase_shift: float | None = None) -> dict[str, float]:
    """The mapping the readers take, holding only the values that were given."""
    given = {"rlnImagePixelSize": apix, "rlnVoltage": kv, "rlnSphericalAberration": cs,
             "rlnAmplitudeContrast": amp_contrast, "rlnPhaseShift": phase_shift}
    return {k: float(v) for k, v in given.items() if v is not None}


def check_overrides(overrides: dict[str, float]) -> list[str]:
    """Problems with the values themselves (reported before any file is read)."""
    import math

    out = []
    for col, v in overrides.items():
        opt = OVERRIDE_OPTIONS[col]
        if not math.isfinite(v):
            out.append(f"{opt} must be a finite number, got {v}")
        elif col in ("rlnImagePixelSize", "rlnVoltage") and v <= 0:
            out.append(f"{opt} must be positive ({OVERRIDE_MEANING[col]}), got {v:g}")
        elif col == "rlnAmplitudeContrast" and not 0 <= v < 1:
            out.append(f"{opt} must be in [0, 1) ({OVERRIDE_MEANING[col]}), got {v:g}")
    return out


# Short names of the values, for "give the pixel size with --apix".
OVERRIDE_NAMES: dict[str, str] = {
    "rlnImagePixelSize": "pixel size", "rlnVoltage": "voltage", "rlnSphericalAberration": "Cs",
    "rlnAmplitudeContrast": "amplitude contrast", "rlnPhaseShift": "phase shift",
}


def supply_hint(column: str) -> str:
    """'give the amplitude contrast with --amp-contrast' for a column an option can supply, else ''."""
    opt = OVERRIDE_OPTIONS.get(column)
    return f"give the {OVERRIDE_NAMES[column]} with {opt}" if opt else ""


def missing_column(column: str, where: str = "") -> str:
    """The problem line for a missing column: names the column and the option that supplies it."""
    hint = supply_hint(column)
    return f"{where}has no {column}; " + (hint if hint else "drgnflow needs it")
