"""`drgn simulate`: a simulated particle dataset with ground truth, as the paper simulated its benchmarks."""

from __future__ import annotations

import argparse

HELP = "simulate a particle dataset with known ground truth (continuous, compositional, junk)"
DESCRIPTION = """\
Simulates cryo-EM particle images the way the cryoDRGN paper made its benchmarks: ground-truth maps from
an atomic model (a procedural protein-like model, or --model FILE.pdb/.cif), uniform random poses,
uniform in-plane shifts, a CTF with random defocus and astigmatism and a B-factor envelope, and white
Gaussian noise at --snr (signal variance of all clean particle images over the whole box / noise
variance).

--heterogeneity continuous: a domain swings about a hinge by --hinge-range rad (1.5, as in the paper);
  --n-gt maps (50) along the reaction coordinate c in [0, 1]; c drawn 'uniform', 'cooperative' (3-
  component Gaussian mixture at the 10th/25th/40th of 50 maps, 0.09 rad) or 'noncontiguous' (0.03 rad);
  each image is rendered from the map of its bin, its exact c kept as drgnGtCoord.
--heterogeneity compositional: --n-states states (core, core+A, core+A+B, ...) with populations
  --state-weights (default 0.2,0.3,0.5 for three, like 30S/50S/70S).
--junk-fraction F: exactly round(F*n) rows are junk (drgnGtJunk=1, drgnGtState=-1, drgnGtVolume=-1),
  shared among --junk-kinds: noise (pure noise), decoy (unrelated objects), ice (large soft blobs).

Writes into OUTDIR (replaced whole, atomically; an existing non-empty folder is replaced only if it is an
earlier drgn simulate output): table.star (canonical table with ground truth), particles.mrcs,
particles.star (RELION 3.1), particles.cs (cryoSPARC), gt_volumes/vol_000.mrc ... + coords.txt, gt.json.
The same --seed gives byte-identical outputs.

Example:
  drgn simulate -o sim --n 2000 -D 64 --apix 3 --snr 0.1 --heterogeneity continuous \\
      --distribution cooperative --junk-fraction 0.1 --seed 0
"""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _pair(text: str) -> tuple[float, float]:
    v = _floats(text)
    if len(v) != 2:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {text!r}")
    return v[0], v[1]


def _words(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from drgn_core.simulate import DISTRIBUTIONS, HETEROGENEITY, JUNK_KINDS, SimConfig

    d = SimConfig()
    parser.add_argument("-o", "--outdir", required=True, metavar="DIR", help="output folder")
    g = parser.add_argument_group("dataset")
    g.add_argument("--n", type=int, default=d.n, help=f"number of images (default {d.n})")
    g.add_argument("-D", type=int, default=d.D, dest="D", help=f"box size in px, even (default {d.D})")
    g.add_argument("--apix", type=float, default=d.apix, help=f"pixel size in Å (default {d.apix:g})")
    g.add_argument("--snr", type=float, default=d.snr, help=f"signal-to-noise ratio (default {d.snr:g})")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice (default 0)")
    g = parser.add_argument_group("heterogeneity and junk")
    g.add_argument("--heterogeneity", choices=HETEROGENEITY, default=d.heterogeneity,
                   help=f"kind of heterogeneity (default {d.heterogeneity})")
    g.add_argument("--distribution", choices=DISTRIBUTIONS, default=d.distribution,
                   help=f"distribution along the reaction coordinate (default {d.distribution})")
    g.add_argument("--n-gt", type=int, default=d.n_gt, help=f"maps along the hinge motion (default {d.n_gt})")
    g.add_argument("--hinge-range", type=float, default=d.hinge_range,
                   help=f"total hinge rotation in rad (default {d.hinge_range:g})")
    g.add_argument("--n-states", type=int, default=d.n_states,
                   help=f"compositional states (default {d.n_states})")
    g.add_argument("--state-weights", type=_floats, metavar="W1,W2,...",
                   help="state populations (default 0.2,0.3,0.5 for 3 states, else proportional to 1..n)")
    g.add_argument("--junk-fraction", type=float, default=d.junk_fraction,
                   help="fraction of junk images (default 0)")
    g.add_argument("--junk-kinds", type=_words, default=d.junk_kinds, metavar="KIND,...",
                   help=f"junk kinds from {','.join(JUNK_KINDS)} (default all)")
    g = parser.add_argument_group("object")
    g.add_argument("--model", metavar="FILE.pdb|.cif",
                   help="atomic model to simulate instead of the procedural protein-like model")
    g.add_argument("--n-atoms", type=int, metavar="N",
                   help="residues of the procedural model (default 3000, fewer if the box is too small)")
    g.add_argument("--resolution", type=float, metavar="Å",
                   help="resolution of the ground-truth maps (default 2 x apix)")
    g.add_argument("--model-seed", type=int, metavar="S",
                   help="seed of the object alone (default --seed): sessions of one specimen at different "
                        "pixel sizes share it, with the same --n-atoms and --resolution")
    g = parser.add_argument_group("imaging")
    g.add_argument("--shift-max", type=float, default=d.shift_max_px, metavar="PX",
                   help=f"in-plane shifts uniform in ±PX pixels (default {d.shift_max_px:g})")
    g.add_argument("--defocus", type=_pair, default=(d.defocus_min, d.defocus_max), metavar="MIN,MAX",
                   help=f"defocus range in Å (default {d.defocus_min:.0f},{d.defocus_max:.0f})")
    g.add_argument("--astigmatism", type=float, default=d.astigmatism, metavar="Å",
                   help=f"defocus V = U - uniform(0, Å) (default {d.astigmatism:g})")
    g.add_argument("--voltage", type=float, default=d.voltage_kv, metavar="KV",
                   help=f"(default {d.voltage_kv:g})")
    g.add_argument("--cs", type=float, default=d.cs_mm, metavar="MM", help=f"(default {d.cs_mm:g})")
    g.add_argument("--amp-contrast", type=float, default=d.amp_contrast, help=f"(default {d.amp_contrast:g})")
    g.add_argument("--bfactor", type=float, default=d.bfactor, metavar="Å²",
                   help=f"CTF envelope exp(-B s²/4), stored as rlnCtfBfactor (default {d.bfactor:g})")
    g = parser.add_argument_group("output")
    g.add_argument("--write-clean", action="store_true", help="also write clean.mrcs (noise-free images)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: outputs then do not depend on the machine, and on a "
                        "shared machine one thread is fastest; more only pay on an idle multi-core machine)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from drgn_core.errors import DrgnError
    from drgn_core.simulate import SimConfig, run_simulation

    if args.threads < 1:
        raise DrgnError(f"--threads must be >= 1 (got {args.threads})")
    cfg = SimConfig(
        n=args.n, D=args.D, apix=args.apix, snr=args.snr, heterogeneity=args.heterogeneity,
        distribution=args.distribution, n_states=args.n_states, state_weights=args.state_weights,
        n_gt=args.n_gt, hinge_range=args.hinge_range, junk_fraction=args.junk_fraction,
        junk_kinds=args.junk_kinds, shift_max_px=args.shift_max, defocus_min=args.defocus[0],
        defocus_max=args.defocus[1], astigmatism=args.astigmatism, voltage_kv=args.voltage, cs_mm=args.cs,
        amp_contrast=args.amp_contrast, bfactor=args.bfactor, resolution=args.resolution,
        n_atoms=args.n_atoms, model_path=args.model, seed=args.seed, model_seed=args.model_seed,
        write_clean=args.write_clean,
    )
    s = run_simulation(cfg, args.outdir, progress=not args.quiet, threads=args.threads)
    junk = ", ".join(f"{k} {v}" for k, v in s["junk_counts"].items() if v) or "none"
    print(f"simulated {s['n']} images ({cfg.D} px, {cfg.apix:g} Å/px, {cfg.heterogeneity} heterogeneity, "
          f"{len(s['volumes']['files'])} ground-truth maps, junk: {junk}) at SNR {cfg.snr:g} "
          f"(noise σ {s['noise_sigma']:.4g}) → {args.outdir}")
    return 0
