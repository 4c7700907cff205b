"""`drgn abinit` against `cryodrgn abinit` (cryoDRGN 4.3.1, cryoDRGN-AI) on the same particles, in the same
run, as JSON: pose accuracy against time.

Both programs run side by side, at the same time, one thread each, so that whatever else loads the machine
slows both alike (as bench/cryodrgn_compare.py does for training). The data is a homogeneous simulated set
from drgnflow's simulator (D 64, SNR 0.1 by default), written once as particles.mrcs + particles.star;
cryoDRGN's own `parse_ctf_star` makes its ctf.pkl from that STAR file, and its `parse_pose_star` output
(never given to its ab initio) tells this script cryoDRGN's rotation and translation conventions, so
neither program reads the other's conversion of the data.

Settings: each program's defaults, homogeneous (`--zdim 0`), one thread, seed 0:
- drgnflow: `drgn abinit table.star particles.mrcs --zdim 0 --threads 1` plus --extra;
- cryoDRGN: `cryodrgn abinit particles.mrcs --ctf ctf.pkl --zdim 0 -n EPOCHS --checkpoint 1
  --uninvert-data --max-threads 1 --num-workers 0 --no-analysis` (--uninvert-data because the simulator
  writes particles white on black; --checkpoint 1 for poses every epoch) plus --cryodrgn-extra.

Measured: the median rotation error (after the best global rotation and hand, `abinit.compare.pose_errors`)
and the median shift error of
- drgnflow's poses after its pose search (the last search round's checkpoint) and at its end (poses.star);
- cryoDRGN's poses at every epoch (pose.E.pkl, read through drgn_core's restricted unpickler),
each with the wall and CPU seconds since its program started, noted when the file appears (polled every
0.5 s). --minutes stops both after that long. Then the time each took to reach the other's best error.

    python3 -m venv .venv-cryodrgn ...            # cryoDRGN 4.3.1 apart, as in bench/README.md
    .venv/bin/python bench/cryodrgn_abinit_compare.py --cryodrgn .venv-cryodrgn/bin/cryodrgn --n 1000 \\
        --epochs 30 --minutes 60 --workdir /tmp/abinit_compare

cryoDRGN is an optional benchmark peer; drgn_core never imports it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cryodrgn_compare import Job, add_data_arguments, prepared, run_side_by_side  # the shared runner


def unpickle(path: Path):
    from drgn_core.io.pickles import RestrictedUnpickler

    return RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()


def conventions(cryodrgn: str, star: Path, D: int, table, apix: float, env: dict, work: Path
                ) -> tuple[bool, float]:
    """(transpose, scale): cryoDRGN's rotation for a particle is ours (transposed when `transpose`), and its
    translation is `scale` × our shift in px. Read off cryoDRGN's own parse_pose_star of the true poses."""
    out = work / "true_poses.pkl"
    subprocess.run([cryodrgn, "parse_pose_star", str(star), "-o", str(out), "-D", str(D)], env=env,
                   check=True, capture_output=True)
    rots, trans = (np.asarray(x, dtype=np.float64) for x in unpickle(out))
    ours = table.poses()
    same, transposed = np.abs(rots - ours).max(), np.abs(rots - ours.transpose(0, 2, 1)).max()
    if min(same, transposed) > 1e-3:
        raise SystemExit(f"cryoDRGN's rotations match neither ours nor their transposes ({same}, "
                         f"{transposed})")
    px = table.shifts_px(apix)
    scale = float(np.sum(trans * px) / max(np.sum(px * px), 1e-12))
    return bool(transposed < same), scale


def errors(table, apix: float, rots: np.ndarray, shifts_px: np.ndarray) -> dict:
    from drgn_core.abinit.compare import pose_errors

    e = pose_errors(table.poses(), table.shifts_px(apix), rots, shifts_px)
    return {"median_rotation_error_deg": round(float(e["median_rotation_error_deg"]), 2),
            "median_shift_error_px": round(float(e["median_shift_error_px"]), 3), "hand": e["hand"]}


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next(({k: r[k] for k in ("label", "wall_s", "cpu_s")} for r in curve
                 if r["median_rotation_error_deg"] <= target), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(ap, 1000, 30, "cryoDRGN's epochs (default 30, its default)")
    ap.add_argument("--minutes", type=float, default=0, help="stop both after this long (0: no limit)")
    ap.add_argument("--extra", default="", help="more drgn abinit flags")
    ap.add_argument("--cryodrgn-extra", default="", help="more cryodrgn abinit flags")
    a = ap.parse_args()
    from drgn_core.io.table import read_table

    data = prepared(a, "none")
    table = read_table(data / "table.star")
    out_d, out_c = a.workdir / "drgnflow", a.workdir / "cryodrgn"
    for d in (out_d, out_c):
        shutil.rmtree(d, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ctf = a.workdir / "ctf.pkl"
    star = data / "particles.star"
    subprocess.run([a.cryodrgn, "parse_ctf_star", str(star), "-o", str(ctf), "-D", str(a.D), "--Apix",
                    str(a.apix)], env=env, check=True, capture_output=True)
    transpose, scale = conventions(a.cryodrgn, star, a.D, table, a.apix, env, a.workdir)

    drgn = Path(sys.executable).parent / "drgn"
    cmd_d = [str(drgn), "abinit", str(data / "table.star"), str(data / "particles.mrcs"), "-o", str(out_d),
             "--zdim", "0", "--threads", "1", "--seed", "0", *shlex.split(a.extra)]
    cmd_c = [a.cryodrgn, "abinit", str(data / "particles.mrcs"), "--ctf", str(ctf), "-o", str(out_c),
             "--zdim", "0", "-n", str(a.epochs), "--checkpoint", "1", "--uninvert-data", "--max-threads", "1",
             "--num-workers", "0", "--no-analysis", "--seed", "0", *shlex.split(a.cryodrgn_extra)]
    import yaml

    def search_done() -> Path:
        """drgnflow's last search round: its checkpoint holds every particle's poses."""
        cfg = out_d / "config.yaml"
        if not cfg.exists():
            return out_d / "no such file"
        its = yaml.safe_load(cfg.read_text())["abinit"]["search"]["iterations"]
        return out_d / "checkpoints" / f"search_{its - 1:03d}.npz"

    jobs = [Job("drgnflow", cmd_d, env, a.workdir / "drgnflow.log",
                lambda e: search_done() if e == 1 else out_d / "model.pt"),
            Job("cryodrgn", cmd_c, env, a.workdir / "cryodrgn.log", lambda e: out_c / f"pose.{e - 1}.pkl")]
    stopped_at, load0, load1 = run_side_by_side(jobs, {"drgnflow": 2, "cryodrgn": a.epochs}, a.minutes, 0.5)

    curves: dict[str, list[dict]] = {"drgnflow": [], "cryodrgn": []}
    for mark, label in ((1, "after the pose search"), (2, "final (poses.star)")):
        if mark not in jobs[0].epochs:
            continue
        if mark == 1:
            ck = np.load(search_done())
            rots, shifts = ck["poses"], ck["shifts"]
        else:
            found = read_table(out_d / "poses.star")
            rots, shifts = found.poses(), found.shifts_px(a.apix)
        curves["drgnflow"].append({"label": label, **jobs[0].epochs[mark],
                                   **errors(table, a.apix, rots, shifts)})
    for e in sorted(jobs[1].epochs):
        try:
            got = unpickle(out_c / f"pose.{e - 1}.pkl")
        except Exception as err:  # a file cut short by --minutes
            print(f"cryodrgn epoch {e - 1}: unreadable poses ({err}); left out", file=sys.stderr)
            continue
        rots, trans = (got, None) if not isinstance(got, tuple) else got
        rots = np.asarray(rots, dtype=np.float64)
        rots = rots.transpose(0, 2, 1) if transpose else rots
        shifts = np.zeros((len(rots), 2)) if trans is None else np.asarray(trans, np.float64) / scale
        curves["cryodrgn"].append({"label": f"epoch {e - 1}", **jobs[1].epochs[e],
                                   **errors(table, a.apix, rots, shifts)})
    best = {k: min((r["median_rotation_error_deg"] for r in v), default=None) for k, v in curves.items()}
    reach = {}
    for k, other in (("drgnflow", "cryodrgn"), ("cryodrgn", "drgnflow")):
        if best[other] is not None:
            reach[f"{k}_to_{other}_best"] = first_reaching(curves[k], best[other])
    print(json.dumps({
        "data": {"path": str(data), "n": a.n, "D": a.D, "apix": a.apix, "snr": a.snr},
        "commands": {j.name: " ".join(j.cmd) for j in jobs},
        "cryodrgn_conventions": {"rotation_transposed": transpose, "translation_per_px": scale},
        "load_average_start_end": [round(load0[0], 2), round(load1[0], 2)], "cpu_count": os.cpu_count(),
        "stopped_at_s": stopped_at, "totals": {j.name: j.total for j in jobs}, "curves": curves,
        "best_median_rotation_error_deg": best, "time_to_reach_the_others_best": reach}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
