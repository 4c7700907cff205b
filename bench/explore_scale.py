"""Benchmark: `drgn explore` at 10⁶ particles with a 10-D latent (issue 14's scale targets).

Builds a run folder the cheap way (random 10-D latents from a mixture of clusters, a stand-in 2-D
embedding as umap.npy, k-means labels, and an untrained model of the default size, 256 × 3, at box D),
starts the real `drgn explore` command in a subprocess and measures, against the targets:

  page_interactive_s   URL printed → the page (Debian chromium via Playwright) has drawn its scatter
                       and counted its selection                                      (≤ 5 s)
  lasso_count_s        a 200-vertex lasso over the embedding, counted over all particles (≤ 1 s)
  save_all_s           saving a selection of all 10⁶ rows (.ind.npy + .ind.txt + .json)   (≤ 2 s)
  server_rss_above_latents_GB   the server's peak resident memory minus z.npy's size  (≤ 2 GB)
  map_view_s           a map at a new point, decoded at the viewing box (64³) and meshed  (≤ 3 s)
  map_D128_s           a D = 128 map decoded and meshed for viewing (bf16 where the CPU has it) (≤ 3 s)
  map_D128_exact_save_s   the same map decoded in float32 and written as .mrc (what *save* costs)

All requests go over HTTP as the page makes them. Prints JSON.

Run: .venv/bin/python bench/explore_scale.py [--n 1000000] [--zdim 10] [--D 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_run(folder: Path, n: int, zdim: int, D: int, seed: int = 0) -> Path:
    """A run + analysis folder for n particles (see the module docstring)."""
    import torch

    from drgn_core import models

    rng = np.random.default_rng(seed)
    k = 20
    centres = rng.normal(size=(k, zdim)) * 1.5
    lab = rng.choice(k, size=n)
    z = (centres[lab] + 0.6 * rng.normal(size=(n, zdim))).astype(np.float32)
    run = folder / "train"
    run.mkdir(parents=True)
    np.save(run / "z.npy", z)
    np.save(run / "indices.npy", np.arange(n, dtype=np.int64))
    torch.manual_seed(seed)
    cfg = models.ModelConfig(D=D, zdim=zdim, apix=1.5)
    torch.save(models.model_payload(models.HetVAE(cfg), cfg), run / "model.pt")
    an = folder / "analyze"
    (an / "kmeans20").mkdir(parents=True)
    proj = rng.normal(size=(zdim, 2)).astype(np.float32)
    np.save(an / "umap.npy", z @ proj)
    np.save(an / "kmeans20" / "labels.npy", lab.astype(np.int64))
    on_data = [int(np.nonzero(lab == j)[0][0]) for j in range(k)]
    (an / "summary.json").write_text(json.dumps({"run": str(run), "kmeans": {
        "k": k, "folder": "kmeans20", "centers_ind": on_data, "centers_z": z[on_data].tolist()}}))
    return run


def request(base: str, token: str, path: str, body=None) -> tuple[float, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"X-Drgn-Token": token,
                                                                  "Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        raw = r.read()
    return time.perf_counter() - t, raw


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--zdim", type=int, default=10)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = make_run(Path(tmp), args.n, args.zdim, args.D)
        build_s = time.perf_counter() - t0
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "drgn_core.cli", "explore", str(run), "--port", "0",
                                 "--no-browser", "--device", "cpu", "--out", str(Path(tmp) / "out")],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        try:
            line = ""
            while "open: " not in line:
                line = proc.stdout.readline()
                if not line and proc.poll() is not None:
                    raise SystemExit("drgn explore exited before printing its URL")
            t_url = time.perf_counter()
            url = line.split("open: ")[1].strip()
            base, token = url.split("/?token=")
            with sync_playwright() as p:
                b = p.chromium.launch(executable_path="/usr/bin/chromium",
                                      args=["--enable-unsafe-swiftshader", "--use-angle=swiftshader"])
                t_launch = time.perf_counter()
                pg = b.new_page(viewport={"width": 1400, "height": 1300})
                pg.goto(url)
                pg.wait_for_selector("body[data-ready='1']", timeout=60_000)
                t_ready = time.perf_counter()
                b.close()
            # a lasso: a 200-vertex ellipse over the middle of the embedding
            emb = np.load(Path(tmp) / "analyze" / "umap.npy")
            c, s = emb.mean(0), emb.std(0)
            th = np.linspace(0, 2 * np.pi, 200, endpoint=False)
            poly = np.column_stack([c[0] + s[0] * np.cos(th), c[1] + 0.7 * s[1] * np.sin(th)]).tolist()
            lasso = {"shapes": [{"op": "add", "kind": "lasso", "x": "UMAP1", "y": "UMAP2", "points": poly}],
                     "thresholds": {"|z|": [0.0, 1e9]}}
            lasso_s, raw = request(base, token, "/api/select", {"selection": lasso})
            count = json.loads(raw)["count"]
            hist_s, _ = request(base, token, "/api/hist?col=z1")
            save_s, raw = request(base, token, "/api/save", {"selection": {"shapes": [], "thresholds": {}},
                                                               "name": "all"})
            saved = json.loads(raw)["record"]["count"]
            # the first decode loads the model (once per session); time the second, at a new point
            request(base, token, "/api/volume", {"kind": "z", "z": [0.5] * args.zdim})
            vol_s, raw = request(base, token, "/api/volume", {"kind": "z", "z": [0.0] * args.zdim})
            info = json.loads(raw)
            mesh_s, mesh = request(base, token, f"/api/mesh?id={info['id']}&level={info['level']}")
            again_s, _ = request(base, token, "/api/volume", {"kind": "z", "z": [0.0] * args.zdim})
            full_s, raw = request(base, token, "/api/volume", {"kind": "z", "z": [0.0] * args.zdim,
                                                                 "D": args.D})
            full = json.loads(raw)
            full_mesh_s, _ = request(base, token, f"/api/mesh?id={full['id']}&level={full['level']}")
            save_map_s, raw = request(base, token, "/api/volume/save", {"id": full["id"], "name": "full"})
            rss = peak_rss_bytes(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    z_bytes = args.n * args.zdim * 4
    n_tri = int(np.frombuffer(mesh[4:8], dtype=np.uint32)[0])
    print(json.dumps({
        "n": args.n, "zdim": args.zdim, "threads": args.threads, "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "build_fixture_s": round(build_s, 2),
        "server_start_to_url_s": round(t_url - start, 2),
        "page_interactive_s": round(t_ready - t_launch, 2),
        "page_interactive_incl_browser_launch_s": round(t_ready - t_url, 2),
        "lasso_count_s": round(lasso_s, 3), "lasso_selected": count,
        "histogram_all_s": round(hist_s, 3),
        "save_all_s": round(save_s, 3), "save_rows": saved,
        "map_view_D": info["D"], "map_view_decode_s": round(vol_s, 2), "map_mesh_s": round(mesh_s, 2),
        "map_view_s": round(vol_s + mesh_s, 2), "map_triangles": n_tri,
        "map_cached_again_s": round(again_s, 3),
        "map_full_D": full["D"], "map_D128_s": round(full_s + full_mesh_s, 2),
        "map_D128_exact_save_s": round(save_map_s, 2),
        "server_peak_rss_GB": round(rss / 1e9, 3), "latents_GB": round(z_bytes / 1e9, 3),
        "server_rss_above_latents_GB": round((rss - z_bytes) / 1e9, 3),
        "targets": {"page_interactive_s": 5, "lasso_count_s": 1, "save_all_s": 2,
                    "server_rss_above_latents_GB": 2, "map_view_s": 3, "map_D128_s": 3},
    }, indent=1))


if __name__ == "__main__":
    main()
