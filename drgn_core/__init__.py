"""drgn_core: the logic behind drgnflow — formats, image formation, the cryoDRGN VAE, analysis, export.

Every `drgn` subcommand is a thin wrapper over a function in this package, so each stage of the
workflow can be run (and tested) by hand, without Snakemake. Conventions (poses, shifts, CTF, units,
indices) are fixed once in `pose`, `ctf`, `fourier` and `io.table`; see docs/architecture.md.
"""

__version__ = "0.1.0"
