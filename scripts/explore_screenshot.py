"""Retake the README's picture of `drgn explore` (docs/explore.png) from a finished demo run.

  bash scripts/demo.sh                          # the workflow on the embedded demo (a few minutes)
  .venv/bin/python scripts/explore_screenshot.py [--results results] [-o docs/explore.png]

Starts `drgn explore` on the demo's high-res run (with its analyze/ and landscape/ folders), opens it in
Debian's chromium through Playwright, colours the UMAP by landscape state, selects one state of the hinge,
shows that state's mean map, and saves a screenshot of the page. The server listens on 127.0.0.1 with
its token and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results", help="the demo's results folder (relative paths: to the "
                    "repository root, as shown on the page)")
    ap.add_argument("-o", "--output", default=str(ROOT / "docs" / "explore.png"))
    ap.add_argument("--state", type=int, default=None, help="state to select (default: the middle one)")
    args = ap.parse_args()
    run = Path(args.results) / "highres" / "train"
    landscape = Path(args.results) / "highres" / "landscape"
    for p in (ROOT / run / "model.pt", ROOT / landscape / "summary.json"):
        if not p.exists():
            sys.exit(f"{p} is missing: run the demo first (bash scripts/demo.sh)")
    n_states = json.loads((ROOT / landscape / "summary.json").read_text())["states"]["n_states"]
    state = n_states // 2 if args.state is None else args.state
    out_dir = Path(args.results) / "explore_screenshot"
    drgn = Path(sys.executable).parent / "drgn"
    srv = subprocess.Popen([str(drgn), "explore", str(run), "--no-browser", "--port", "0", "--exit-after",
                            "300", "--out", str(out_dir), "--device", "cpu"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        url = None
        for line in srv.stdout:
            m = re.search(r"open: (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            sys.exit("drgn explore did not print its URL")
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1050})
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            page.select_option("#lstate", str(state))
            page.click("#state-select")
            page.wait_for_function("document.body.dataset.busy === '0'", timeout=60_000)
            page.click("#vol-state")
            page.wait_for_function(
                f"document.getElementById('volinfo').textContent.startsWith('state {state} mean map')",
                timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=args.output, full_page=True)
            browser.close()
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    print(f"wrote {args.output} (state {state} of {n_states} selected, its mean map shown)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
