"""`drgn explore` in a real browser (Debian's chromium driven by Playwright) and over plain HTTP.

The run is built the cheap way (tests/conftest_latent.py): latents chosen by the test (three clusters),
a tiny untrained model for the maps, and the conventions fixture's 400 particles imported from their
cryoSPARC .cs, so images, export and uids are real. The page draws a subsample of 150 of the 400
particles; every expected answer below is computed here, independently, over all 400.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest_latent import add_tiny_model, clusters, make_run
from helpers_io import FIXTURE

from drgn_core.cli import main
from drgn_core.importing import import_particles
from drgn_core.io.mrc import read_mrc, write_mrc
from drgn_core.io.table import read_table, write_table

CHROMIUM = "/usr/bin/chromium"
N_DRAWN = 150


# ---- the run, the server, the browser ----------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Table (from particles.cs), a run (z, indices, tiny model), its analysis (UMAP, k-means)."""
    d = tmp_path_factory.mktemp("explore")
    data = d / "data"
    data.mkdir()
    shutil.copy(FIXTURE / "particles.cs", data / "particles.cs")
    shutil.copytree(FIXTURE / "stacks", data / "stacks")
    table = d / "table.star"
    write_table(import_particles(data / "particles.cs"), table)
    rng = np.random.default_rng(3)
    centres = np.array([[-2.0, 0.0, 0.5], [2.0, 1.0, -0.5], [0.0, -2.5, 0.0]])
    z, labels = clusters(rng, centres, [160, 140, 100], scale=0.6)
    perm = rng.permutation(len(z))
    z, labels = z[perm], labels[perm]
    run = make_run(d / "results" / "highres" / "train", z)
    add_tiny_model(run, zdim=3, D=16, apix=9.0)
    an = d / "results" / "highres" / "analyze"
    (an / "kmeans3").mkdir(parents=True)
    umap = (z[:, :2] @ np.array([[0.8, -0.6], [0.6, 0.8]])).astype(np.float32)  # a stand-in embedding
    np.save(an / "umap.npy", umap)
    np.save(an / "kmeans3" / "labels.npy", labels.astype(np.int64))
    on_data = [int(np.nonzero(labels == k)[0][0]) for k in range(3)]
    (an / "summary.json").write_text(json.dumps({"run": str(run), "kmeans": {
        "k": 3, "folder": "kmeans3", "centers_ind": on_data, "centers_z": z[on_data].tolist()}}))
    # a landscape folder beside it (drgn landscape's layout): states = the clusters in reverse order, and
    # state k's mean map a recognisable volume (a cube of side 2k + 4 at the centre)
    ls = d / "results" / "highres" / "landscape"
    for k in range(3):
        (ls / "states" / f"state_{k}").mkdir(parents=True)
        vol = np.zeros((16, 16, 16), np.float32)
        vol[8 - k - 2:8 + k + 2, 8 - k - 2:8 + k + 2, 8 - k - 2:8 + k + 2] = 1.0
        write_mrc(ls / "states" / f"state_{k}" / "mean.mrc", vol, 9.0)
    np.save(ls / "particle_states.npy", (2 - labels).astype(np.int64))
    (ls / "summary.json").write_text(json.dumps({"run": str(run), "states": {"n_states": 3}}))
    return {"dir": d, "table": table, "data": data, "run": run, "z": z, "umap": umap, "labels": labels,
            "centres_pos": on_data}


@pytest.fixture(scope="module")
def server(world):
    """The explorer on a free loopback port, in a thread; shut down after the module."""
    from drgn_core.explore.data import load_explore_data
    from drgn_core.explore.server import Explorer, make_server, url_of

    data = load_explore_data(world["run"], table=world["table"], max_points=N_DRAWN, seed=0,
                             log=lambda m: None)
    app = Explorer(data, world["dir"] / "explore_out", device="cpu")
    srv = make_server(app, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    yield {"url": url_of(srv, app), "base": f"http://127.0.0.1:{srv.server_address[1]}", "app": app,
           "out": app.out_dir, "token": app.token}
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser():
    # CI (.ci/run sets DRGN_REQUIRE_BROWSER=1) must run these in the real browser, never skip them
    required = os.environ.get("DRGN_REQUIRE_BROWSER") == "1"
    if not required:
        pytest.importorskip("playwright.sync_api", reason="pip install playwright")
        if not Path(CHROMIUM).exists():
            pytest.skip(f"{CHROMIUM} absent (apt-get install chromium; scripts/setup.sh does)")
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} absent: scripts/setup.sh installs Debian's chromium"
    from playwright import sync_api
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    pg = browser.new_page(viewport={"width": 1400, "height": 1300})
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server["url"])
    pg.wait_for_selector("body[data-ready='1']", timeout=20_000)
    yield pg
    pg.close()
    assert not errors, errors


def settle(pg) -> None:
    """Wait until the page has no request in flight."""
    pg.wait_for_function("document.body.dataset.busy === '0'", timeout=20_000)


def drag_through(pg, box: dict, verts: list[tuple[float, float]]) -> None:
    """Press the mouse at the first canvas pixel, move through the others, release, and wait for the page
    (a lasso with several vertices, a box with two corners)."""
    pg.mouse.move(box["x"] + verts[0][0], box["y"] + verts[0][1])
    pg.mouse.down()
    for vx, vy in verts[1:]:
        pg.mouse.move(box["x"] + vx, box["y"] + vy)
    pg.mouse.up()
    settle(pg)


def view(pg) -> tuple[dict, float, float, float, float]:
    """Canvas box on the page and its data range (the page's data-* attributes)."""
    box = pg.locator("#scatter").bounding_box()
    a = pg.eval_on_selector("#scatter", "c => [c.dataset.x0, c.dataset.x1, c.dataset.y0, c.dataset.y1]")
    return box, *(float(v) for v in a)


def to_data(px: float, py: float, x0, x1, y0, y1, W=600, H=600) -> tuple[float, float]:
    """Canvas pixel → data coordinates, the same arithmetic as the page (documented in app.js)."""
    return x0 + px * (x1 - x0) / W, y1 - py * (y1 - y0) / H


def inside_even_odd(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Own ray-casting point-in-polygon (even-odd rule), independent of the server's implementation."""
    inside = np.zeros(len(x), dtype=bool)
    n = len(poly)
    for i in range(n):
        (xa, ya), (xb, yb) = poly[i], poly[(i + 1) % n]
        crosses = (ya > y) != (yb > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = xa + (y - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (x < xc)
    return inside


def api(server, path: str, body=None, token: str | None = "default"):
    """(status, decoded JSON or bytes) of a request to the server."""
    tok = server["token"] if token == "default" else token
    headers = {"Content-Type": "application/json"}
    if tok is not None:
        headers["X-Drgn-Token"] = tok
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(server["base"] + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raw, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
    return status, (json.loads(raw) if "json" in ctype else raw)


# ---- security -------------------------------------------------------------------------------------------
def test_every_request_needs_the_token(server):
    for path in ["/", "/static/app.js", "/api/meta", "/api/points?x=z1&y=z2&c=z3"]:
        assert api(server, path, token=None)[0] == 403, path
        assert api(server, path, token="wrong")[0] == 403, path
    _, body = api(server, "/api/meta", token=None)
    assert body == {"error": "forbidden: this server needs the token printed with its URL"}
    assert api(server, "/api/meta")[0] == 200
    with urllib.request.urlopen(server["url"], timeout=10) as r:  # the printed URL carries the token
        assert r.status == 200 and b"drgn explore" in r.read()


def test_path_traversal_is_refused_and_bad_requests_get_json_4xx(server, world):
    out = server["out"]
    for p in ["../../../../etc/passwd", "/etc/passwd", str(world["table"]), "selections/../../table.star"]:
        status, body = api(server, "/api/load", {"path": p})
        assert status == 403, p
        assert "lies outside the run folder and the output folder" in body["error"]
    sel_all = {"shapes": [], "thresholds": {}}
    status, body = api(server, "/api/save", {"selection": sel_all, "name": "../escaped"})
    assert status == 400 and "must be a plain file name" in body["error"]
    status, body = api(server, "/api/select", {"selection": {"shapes": [{"op": "add", "kind": "saved",
                                                                         "path": "/etc/passwd"}]}})
    assert status == 403
    assert not (out.parent / "escaped.ind.npy").exists() and not list(out.parent.glob("escaped*"))
    status, body = api(server, "/api/hist?col=nope")
    assert status == 400 and body["error"].startswith("no column 'nope'; choose one of UMAP1, UMAP2")
    assert api(server, "/api/select", b"{not json")[0] == 400
    assert api(server, "/api/particle?pos=400")[1] == {
        "error": "parameter 'pos' = 400 is out of range [0, 399]"}
    assert api(server, "/api/nothing")[0] == 404
    assert api(server, "/api/montage", {"selection": sel_all, "n": "many"}) == (
        400, {"error": "parameter 'n' must be an integer"})
    assert api(server, "/api/traverse", {"anchors": [0]})[0] == 400
    req = urllib.request.Request(server["base"] + "/api/meta", method="PUT", headers={"X-Drgn-Token": "x"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 501 and json.loads(e.value.read()) == {"error": "Unsupported method ('PUT')"}
    assert api(server, "/static/../server.py")[0] in (403, 404)


def test_cli_prints_url_token_and_tunnel_and_stops_by_itself(world, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "drgn_core.cli", "explore", str(world["run"]),
                             "--port", "0", "--no-browser", "--exit-after", "20",
                             "--out", str(tmp_path / "o")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        url = lines[1].split("open: ")[1].strip()
        assert url.startswith("http://127.0.0.1:") and "/?token=" in url
        port = url.split(":")[2].split("/")[0]
        assert f"ssh -N -L {port}:127.0.0.1:{port} " in lines[2]
        bare = url.split("?")[0] + "api/meta"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bare, timeout=10)
        assert e.value.code == 403
        with urllib.request.urlopen(url.replace("/?", "/api/meta?"), timeout=10) as r:
            assert json.loads(r.read())["n"] == 400
        proc.terminate()  # Ctrl-C equivalent for the test; --exit-after is the backstop
        assert proc.wait(timeout=20) is not None
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- in the browser ----------------------------------------------------------------------------------------
def test_lasso_selects_exactly_the_particles_inside_the_drawn_polygon(page, server, world):
    box, x0, x1, y0, y1 = view(page)
    assert page.eval_on_selector("#xcol", "s => s.value") == "UMAP1"
    # a star-ish polygon over the upper-left cluster and part of its neighbour, in canvas pixels
    verts = [(120, 140), (330, 90), (420, 260), (300, 250), (360, 420), (170, 380), (90, 250)]
    drag_through(page, box, verts)
    poly = np.array([to_data(vx, vy, x0, x1, y0, y1) for vx, vy in verts])
    um = world["umap"].astype(np.float64)
    want = np.sort(np.nonzero(inside_even_odd(um[:, 0], um[:, 1], poly))[0])  # run rows = table rows here
    assert 20 < want.size < 380
    assert int(page.inner_text("#count")) == want.size
    page.fill("#selname", "lassoed")
    page.click("#save")
    page.wait_for_function("document.getElementById('selinfo').dataset.saved !== undefined")
    out = server["out"] / "selections"
    got = np.load(out / "lassoed.ind.npy")
    np.testing.assert_array_equal(got, want)
    assert [int(v) for v in (out / "lassoed.ind.txt").read_text().split()] == want.tolist()
    rec = json.loads((out / "lassoed.json").read_text())
    assert rec["count"] == want.size and rec["index_file"] == "lassoed.ind.npy"
    (shape,) = rec["shapes"]
    assert (shape["op"], shape["kind"], shape["x"], shape["y"]) == ("add", "lasso", "UMAP1", "UMAP2")
    np.testing.assert_allclose(np.array(shape["points"]), poly, rtol=0, atol=1e-12)
    assert rec["run"] == str(world["run"].resolve()) and rec["thresholds"] == {}


def test_threshold_on_a_subsampled_scatter_selects_from_all_particles(page, server, world):
    table = read_table(world["table"])
    defocus = ((table.particles["rlnDefocusU"] + table.particles["rlnDefocusV"]) / 2).to_numpy()
    d32 = np.sort(defocus.astype(np.float32).astype(np.float64))
    lo, hi = float(d32[99] + d32[100]) / 2, float(d32[299] + d32[300]) / 2   # between values: no ties
    page.select_option("#hcol", "defocus")
    settle(page)
    page.fill("#thr-lo", repr(lo))
    page.fill("#thr-hi", repr(hi))
    page.click("#thr-apply")
    settle(page)
    v = defocus.astype(np.float32)
    want = np.nonzero((v >= lo) & (v <= hi))[0]
    assert want.size == 200
    assert int(page.inner_text("#count")) == 200
    drawn = np.frombuffer(api(server, "/api/sample")[1], dtype=np.int32)
    # the count is over all particles, not the drawn subset's
    assert drawn.size == N_DRAWN and np.setdiff1d(want, drawn).size > 0
    page.fill("#selname", "mid_defocus")
    page.click("#save")
    page.wait_for_function("document.getElementById('selinfo').dataset.saved !== undefined")
    np.testing.assert_array_equal(np.load(server["out"] / "selections" / "mid_defocus.ind.npy"), want)
    rec = json.loads((server["out"] / "selections" / "mid_defocus.json").read_text())
    assert rec["thresholds"] == {"defocus": [lo, hi]}

    # the upper handle dragged with the mouse to the histogram's middle: the new bound, on all particles
    hb = page.locator("#hist").bounding_box()
    edges = api(server, "/api/hist?col=defocus")[1]["edges"]
    x_hi = hb["x"] + (hi - edges[0]) / (edges[-1] - edges[0]) * hb["width"]
    page.mouse.move(x_hi, hb["y"] + 50)
    page.mouse.down()
    page.mouse.move(hb["x"] + hb["width"] * 0.6, hb["y"] + 50, steps=4)
    page.mouse.up()
    settle(page)
    hi2 = float(page.input_value("#thr-hi"))
    assert float(page.input_value("#thr-lo")) == lo and hi2 < hi
    want2 = np.nonzero((v >= lo) & (v <= hi2))[0]
    assert 0 < want2.size < 200 and int(page.inner_text("#count")) == want2.size


def test_selection_round_trips_save_load_save(page, server):
    spec = {"shapes": [{"op": "add", "kind": "box", "x": "z1", "y": "z2", "points": [[-5, -5], [0.5, 5]]},
                       {"op": "subtract", "kind": "box", "x": "z1", "y": "z3",
                        "points": [[-5, 0.3], [5, 5]]}],
            "thresholds": {"|z|": [0.5, 3.0]}}
    status, rec = api(server, "/api/save", {"selection": spec, "name": "first"})
    assert status == 200
    first = np.load(server["out"] / "selections" / "first.ind.npy")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.select_option("#saved", "selections/first.ind.npy")
    page.click("#load")
    settle(page)
    assert int(page.inner_text("#count")) == first.size == rec["record"]["count"]
    page.fill("#selname", "second")
    page.click("#save")
    page.wait_for_function("document.getElementById('selinfo').dataset.saved !== undefined")
    np.testing.assert_array_equal(np.load(server["out"] / "selections" / "second.ind.npy"), first)


def test_map_decoded_from_the_page_equals_drgn_volumes_at_the_same_z(page, server, world, tmp_path):
    drawn = np.frombuffer(api(server, "/api/sample")[1], dtype=np.int32)
    pos = click_point(page, server, world, int(drawn[0]))
    assert page.get_attribute("#info", "data-row") == str(pos)          # run rows are table rows here
    page.wait_for_function("document.getElementById('particle-img').naturalWidth === 48")  # its image
    page.click("#vol-point")
    page.wait_for_function("document.getElementById('volinfo').dataset.id !== undefined", timeout=30_000)
    settle(page)
    tri = int(page.get_attribute("#vol", "data-triangles"))
    assert tri > 0
    page.fill("#volname", "clicked")
    page.click("#vol-save")
    page.wait_for_function("document.getElementById('volinfo').dataset.saved !== undefined")
    vol, apix = read_mrc(server["out"] / "volumes" / "clicked.mrc", mmap=False)
    np.save(tmp_path / "z.npy", world["z"][pos:pos + 1])
    assert main(["volumes", str(world["run"]), "-o", str(tmp_path / "ref"),
                 "--z-file", str(tmp_path / "z.npy")]) == 0
    ref, ref_apix = read_mrc(tmp_path / "ref" / "vol_000.mrc", mmap=False)
    assert apix == pytest.approx(ref_apix) == pytest.approx(9.0)
    np.testing.assert_allclose(vol, ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))
    # the same point again comes from the cache; a higher level gives a smaller surface
    decoded = server["app"].maps.decoded
    assert api(server, "/api/volume", {"kind": "point", "pos": pos})[1]["decoded_total"] == decoded
    page.eval_on_selector("#level", "e => { e.value = '900'; e.dispatchEvent(new Event('change')); }")
    settle(page)
    assert int(page.get_attribute("#vol", "data-triangles")) != tri


def test_export_from_the_page_writes_cs_and_csg(page, server, world):
    from cryosparc.dataset import Dataset

    box, x0, x1, y0, y1 = view(page)
    page.select_option("#tool", "box")
    a, b = (50, 60), (320, 330)
    drag_through(page, box, [a, b])
    (xa, ya), (xb, yb) = to_data(*a, x0, x1, y0, y1), to_data(*b, x0, x1, y0, y1)
    um = world["umap"].astype(np.float64)
    rows = np.nonzero((um[:, 0] >= min(xa, xb)) & (um[:, 0] <= max(xa, xb)) &
                      (um[:, 1] >= min(ya, yb)) & (um[:, 1] <= max(ya, yb)))[0]
    assert rows.size > 10
    page.fill("#selname", "J7_picked")
    page.click("#export")
    page.wait_for_function("document.getElementById('selinfo').dataset.exported !== undefined",
                           timeout=30_000)
    out = server["out"] / "exports" / "J7_picked"
    np.testing.assert_array_equal(np.load(out / "indices.npy"), rows)
    table = read_table(world["table"])
    original = Dataset.load(world["data"] / "particles.cs")
    sub = Dataset.load(out / "J7_picked.cs")
    want = original.take(table.source_rows()[rows])
    assert sub.fields() == original.fields()
    for f in original.fields():
        np.testing.assert_array_equal(sub[f], want[f], err_msg=f)
    np.testing.assert_array_equal(np.asarray(sub["uid"], dtype=np.uint64), table.uids()[rows])
    csg = yaml.safe_load((out / "J7_picked.csg").read_text())
    assert csg["group"]["name"] == "particles" and csg["group"]["type"] == "particle"
    for slot, entry in csg["results"].items():
        assert entry == {"metafile": ">J7_picked.cs", "num_items": rows.size, "type": f"particle.{slot}"}
    assert [int(u) for u in (out / "uids.txt").read_text().split()] == [int(u) for u in table.uids()[rows]]


def test_landscape_state_colours_selects_shows_its_mean_map_and_exports(page, server, world):
    states = 2 - world["labels"]
    assert page.eval_on_selector("#ccol", "s => s.value") == "state"     # coloured by state by default
    page.select_option("#lstate", "1")
    page.click("#state-select")
    settle(page)
    assert page.text_content("#count") == str(int((states == 1).sum()))
    page.click("#vol-state")
    page.wait_for_function("document.getElementById('volinfo').textContent.startsWith('state 1 mean map')",
                           timeout=20_000)
    page.fill("#volname", "state1_mean")
    page.click("#vol-save")
    settle(page)
    saved, _ = read_mrc(server["out"] / "volumes" / "state1_mean.mrc", mmap=False)
    assert saved.shape == (16, 16, 16) and saved.sum() == 6**3                 # the file's map, not a decode
    page.click("#export")
    page.wait_for_function("document.getElementById('selinfo').dataset.exported !== undefined",
                           timeout=30_000)
    np.testing.assert_array_equal(np.load(server["out"] / "exports" / "state_1" / "indices.npy"),
                                  np.nonzero(states == 1)[0])


def click_point(page, server, world, p: int) -> int:
    """Click drawn particle `p` with the pick tool → the position the page picked (its nearest point)."""
    box, x0, x1, y0, y1 = view(page)
    page.select_option("#tool", "pick")
    x, y = (float(v) for v in world["umap"][p])
    page.evaluate("delete document.getElementById('info').dataset.clicked")
    page.mouse.click(box["x"] + (x - x0) / (x1 - x0) * 600, box["y"] + (y1 - y) / (y1 - y0) * 600)
    page.wait_for_function("document.getElementById('info').dataset.clicked !== undefined")
    return int(page.get_attribute("#info", "data-clicked"))


def test_traversal_between_picked_anchors_from_the_page(page, server, world):
    box = view(page)[0]   # a lasso first, so the screenshot shows a selection too
    verts = [(60, 60), (330, 70), (300, 330), (80, 300)]
    drag_through(page, box, verts)
    assert 0 < int(page.inner_text("#count")) < 400
    drawn = np.frombuffer(api(server, "/api/sample")[1], dtype=np.int32)
    in0 = [int(p) for p in drawn if world["labels"][p] == 0]
    zc = world["z"][in0]
    centre = zc.mean(0)   # two points of the cluster's core, apart along z1 (outliers are graph islands)
    a, b = (in0[int(np.argmin(((zc - centre - [s, 0, 0]) ** 2).sum(1)))] for s in (-0.5, 0.5))
    anchors = []
    for p in (a, b):
        anchors.append(click_point(page, server, world, p))
        page.click("#anchor-add")
    page.fill("#trav-n", "3")
    page.click("#traverse")
    page.wait_for_function("document.getElementById('scatter').dataset.path !== undefined || "
                           "document.getElementById('status').style.color === 'rgb(255, 136, 136)'",
                           timeout=60_000)
    settle(page)
    assert page.get_attribute("#scatter", "data-path") is not None, page.inner_text("#status")
    folder = server["out"] / "traversals" / "selection_path"
    assert sorted(p.name for p in folder.glob("vol_*.mrc")) == ["vol_000.mrc", "vol_001.mrc", "vol_002.mrc"]
    zv = np.loadtxt(folder / "z_values.txt", ndmin=2)
    np.testing.assert_allclose(zv[0], world["z"][anchors[0]], atol=1e-5)
    np.testing.assert_allclose(zv[-1], world["z"][anchors[1]], atol=1e-5)
    assert page.get_attribute("#series", "max") == "2"
    shot = os.environ.get("DRGN_EXPLORE_SCREENSHOT")   # docs/explore.png is made this way
    page.screenshot(path=shot or str(server["out"] / "screenshot.png"))


# ---- over HTTP only: selection arithmetic, columns, images ------------------------------------------------
def test_shapes_combine_left_to_right_and_thresholds_cut_all_particles(server, world):
    z = world["z"].astype(np.float64)
    box_a = [[-1.0, -3.0], [3.0, 3.0]]                  # on z1 × z2
    tri = [[-3.0, -3.0], [3.0, -3.0], [0.0, 2.0]]       # on z2 × z3
    spec = {"shapes": [{"op": "add", "kind": "box", "x": "z1", "y": "z2", "points": box_a},
                       {"op": "intersect", "kind": "lasso", "x": "z2", "y": "z3", "points": tri},
                       {"op": "subtract", "kind": "box", "x": "z1", "y": "z2",
                        "points": [[0.0, -9], [9, 0.0]]},
                       {"op": "add", "kind": "box", "x": "UMAP1", "y": "UMAP2",
                        "points": [[-9, -9], [-2, 9]]}],
            "thresholds": {"z3": [-1.0, 1.5]}}
    in_a = (z[:, 0] >= -1) & (z[:, 0] <= 3) & (z[:, 1] >= -3) & (z[:, 1] <= 3)
    in_tri = inside_even_odd(z[:, 1], z[:, 2], np.array(tri))
    in_c = (z[:, 0] >= 0) & (z[:, 1] <= 0)
    um = world["umap"].astype(np.float64)
    in_d = um[:, 0] <= -2
    want = ((in_a & in_tri & ~in_c) | in_d) & (z[:, 2] >= -1) & (z[:, 2] <= 1.5)
    status, body = api(server, "/api/select", {"selection": spec})
    assert status == 200 and body["count"] == int(want.sum()) and 0 < want.sum() < 400
    # "subtract" first starts from every particle
    only_sub = {"shapes": [{"op": "subtract", "kind": "box", "x": "z1", "y": "z2", "points": box_a}]}
    assert api(server, "/api/select", {"selection": only_sub})[1]["count"] == int((~in_a).sum())
    assert api(server, "/api/select", {"selection": {}})[1]["count"] == 400
    bad = {"shapes": [], "thresholds": {"z1": [0, "nan"]}}
    assert api(server, "/api/select", {"selection": bad}) == (
        400, {"error": "threshold z1 hi must be finite, got 'nan'"})
    assert api(server, "/api/select", {"selection": {"shapes": [{"op": "xor", "kind": "box"}]}})[0] == 400


def test_particle_image_and_montage_are_the_particles_images(server, world):
    from io import BytesIO

    from PIL import Image

    from drgn_core.io.images import read_images

    table = read_table(world["table"])
    status, png = api(server, "/api/image?pos=7")
    img = np.asarray(Image.open(BytesIO(png)))
    ref = read_images(table, np.array([7]))[0]
    lo, hi = np.percentile(ref, [1, 99])
    want = np.clip((ref - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)[::-1]
    assert status == 200 and img.shape == (48, 48)
    np.testing.assert_array_equal(img, want)
    spec = {"shapes": [{"op": "add", "kind": "box", "x": "z1", "y": "z2", "points": [[-9, -9], [9, 9]]}]}
    status, png = api(server, "/api/montage", {"selection": spec, "n": 10})
    assert status == 200 and np.asarray(Image.open(BytesIO(png))).shape == (3 * 48, 4 * 48)
    p = api(server, "/api/particle?pos=7")[1]
    assert p["row"] == 7 and p["values"]["z2"] == pytest.approx(float(world["z"][7, 1]))
    assert p["values"]["kmeans"] == world["labels"][7]


def test_columns_include_filter_verdict_ground_truth_and_held_out(tmp_path):
    from conftest_latent import write_gt_table

    from drgn_core.explore.data import load_explore_data

    rng = np.random.default_rng(0)
    n = 50
    idx = np.sort(rng.choice(80, size=n, replace=False))
    run = make_run(tmp_path / "results" / "pilot" / "z2", rng.normal(size=(n, 2)), idx)
    np.save(run / "val_indices.npy", idx[:5])
    coord = rng.uniform(size=80)
    table = write_gt_table(tmp_path / "table.star", 80, coord=coord, junk=(np.arange(80) % 7 == 0))
    fdir = tmp_path / "results" / "filter"
    fdir.mkdir(parents=True)
    kept = np.arange(0, 80, 2)
    np.save(fdir / "kept.npy", kept)
    d = load_explore_data(run, table=table, log=lambda m: None)   # the filter folder found by the layout
    np.testing.assert_array_equal(d.columns["filter_kept"], np.isin(idx, kept))
    np.testing.assert_allclose(d.columns["gt_coord"], coord[idx], rtol=0, atol=1e-6)  # table: 6 decimals
    np.testing.assert_array_equal(d.columns["gt_junk"], (idx % 7 == 0))
    np.testing.assert_array_equal(d.columns["held_out"], np.isin(idx, idx[:5]))
    np.testing.assert_allclose(d.columns["|z|"], np.linalg.norm(d.z, axis=1), rtol=1e-6)
    assert d.meta()["default_axes"] == ["PC1", "PC2"] and "UMAP1" not in d.columns


def test_maps_at_a_selection_mean_and_a_kmeans_centre_use_those_latents(server, world):
    z = world["z"]
    spec = {"shapes": [{"op": "add", "kind": "box", "x": "z1", "y": "z2", "points": [[-9, -9], [0, 9]]}]}
    status, m = api(server, "/api/volume", {"kind": "mean", "selection": spec})
    assert status == 200
    np.testing.assert_allclose(m["z"], z[z[:, 0] <= 0].mean(0), rtol=1e-5)
    assert m["label"] == f"mean of {int((z[:, 0] <= 0).sum())} particles"
    status, m = api(server, "/api/volume", {"kind": "kmeans", "k": 2})
    np.testing.assert_allclose(m["z"], z[world["centres_pos"][2]], rtol=1e-6)
    assert (m["D"], m["apix"]) == (16, pytest.approx(9.0))
    assert api(server, "/api/volume", {"kind": "kmeans", "k": 3})[1] == {
        "error": "parameter 'k' = 3 is out of range [0, 2]"}
    assert api(server, "/api/volume", {"kind": "z", "z": [0, 0, 0], "D": 15})[1] == {
        "error": "D must be even, got 15"}
    assert api(server, f"/api/mesh?id={m['id']}&level=1e9")[0] == 400
    empty = {"shapes": [{"op": "add", "kind": "box", "x": "z1", "y": "z2", "points": [[50, 50], [60, 60]]}]}
    assert api(server, "/api/volume", {"kind": "mean", "selection": empty})[1] == {
        "error": "the selection is empty; it has no mean latent"}


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["explore", str(tmp_path / "nope"), "--no-browser"]) == 2
    assert capsys.readouterr().err == f"drgn explore: error: {tmp_path / 'nope'}: no such run directory\n"
    run = make_run(tmp_path / "run", np.zeros((5, 2)))
    assert main(["explore", str(run), "--no-browser", "--port", "70000"]) == 2
    assert capsys.readouterr().err.endswith("error: --port must lie in 0 … 65535, got 70000\n")
    assert main(["explore", str(run), "--no-browser", "--table", str(tmp_path / "t.star")]) == 2
    assert capsys.readouterr().err.endswith(f"error: {tmp_path / 't.star'}: no such particle table\n")
