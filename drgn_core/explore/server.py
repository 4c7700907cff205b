"""The explorer's HTTP server: standard library only, one user, loopback by default.

Why the standard library: the page is one static HTML/JS file of our own and a JSON/binary API; a
`ThreadingHTTPServer` serves that with no dependency that could break with a release (the failure
mode users report for notebook widgets). Heavy work (selection over all particles, histograms, decoding,
meshing) happens here in numpy / torch; the browser draws a subsample.

Security (issue 14, shared login nodes): every request needs the random token printed with the URL
(query `token=` or header `X-Drgn-Token`), else 403; every path a request names is resolved and must lie
inside the run folder or the output folder, else 403; names of new files are plain names; bad requests get
a 4xx JSON message and internal errors a 500 JSON message, never a traceback page.
"""

from __future__ import annotations

import base64
import hmac
import io
import ipaddress
import json
import secrets
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from drgn_core.errors import DrgnError
from drgn_core.explore import selection as sel
from drgn_core.explore.data import ExploreData
from drgn_core.explore.volumes import MapCache, mesh_bytes, save_map
from drgn_core.io.atomic import atomic_path

MAX_BODY = 16 << 20
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
          "index.html": "text/html; charset=utf-8"}
MONTAGE_MAX = 64
# Maps are decoded for viewing at no more than 64³: the displayed surface is meshed at most at that
# sampling anyway, and decoding cost grows as D³ (a 256-wide decoder takes tens of seconds for 128³ on
# two CPU cores). Saving a map decodes it at the run's full box.
DISPLAY_D = 64


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Explorer:
    """The state behind the server: data, output folder, map cache, the latent graph once built."""

    def __init__(self, data: ExploreData, out_dir: Path, device: str = "cpu", token: str | None = None,
                 seed: int = 0, display_D: int | None = DISPLAY_D):
        self.data = data
        self.out_dir = Path(out_dir).resolve()
        self.token = token or secrets.token_urlsafe(24)
        self.maps = MapCache(data.run_dir, device=device)
        self.seed = seed
        self.roots = [self.out_dir, Path(data.run_dir).resolve()]
        self.display_D = display_D
        self._box: int | None = None
        self._graph = None
        self._graph_lock = threading.Lock()

    # ---- paths ----------------------------------------------------------------------------------------
    def confine(self, path: str) -> Path:
        """`path` (relative to the output folder, or absolute) resolved; refused unless it lies inside the
        output folder or the run folder."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise HttpError(400, "path must be a non-empty string")
        p = Path(path)
        full = (p if p.is_absolute() else self.out_dir / p).resolve()
        if not any(full == r or full.is_relative_to(r) for r in self.roots):
            raise HttpError(403, f"path {path!r} lies outside the run folder and the output folder")
        return full

    def box(self) -> int:
        """The run's training box (read from model.pt once)."""
        if self._box is None:
            from drgn_core.explore.runlink import model_box

            self._box = model_box(self.data.run_dir)
        return self._box

    def view_box(self) -> int:
        """Box at which maps are decoded for viewing: the training box, capped at display_D."""
        D = self.box()
        return D if self.display_D is None or D <= self.display_D else self.display_D

    # ---- selections -----------------------------------------------------------------------------------
    def mask(self, spec) -> tuple[dict, np.ndarray]:
        spec = sel.check_spec(spec)
        return spec, sel.selected_mask(self.data, spec, resolve_saved=self.confine)

    def graph(self):
        with self._graph_lock:
            if self._graph is None:
                from drgn_core.traversal import build_graph

                self._graph = build_graph(self.data.z, seed=self.seed, device=self.maps.device)
            return self._graph


def _png(img: np.ndarray) -> bytes:
    """8-bit greyscale PNG of a 2-D image, contrast from its 1st–99th percentile."""
    from PIL import Image

    lo, hi = np.percentile(img, [1, 99])
    u8 = np.clip((img - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8[::-1]).save(buf, format="PNG")  # row 0 at the bottom, as the maps are drawn
    return buf.getvalue()


def _int(q: dict, key: str, lo: int = 0, hi: int | None = None) -> int:
    try:
        v = int(q[key])
    except (KeyError, TypeError, ValueError):
        raise HttpError(400, f"parameter {key!r} must be an integer") from None
    if v < lo or (hi is not None and v > hi):
        raise HttpError(400, f"parameter {key!r} = {v} is out of range [{lo}, {hi}]")
    return v


def _float(q: dict, key: str) -> float:
    try:
        v = float(q[key])
    except (KeyError, TypeError, ValueError):
        raise HttpError(400, f"parameter {key!r} must be a number") from None
    if not np.isfinite(v):
        raise HttpError(400, f"parameter {key!r} must be finite")
    return v


class Handler(BaseHTTPRequestHandler):
    """Routes GET/POST requests to the Explorer; every answer is JSON, PNG, binary or a static file."""

    server_version = "drgn-explore"
    app: Explorer  # set on the subclass made by make_server

    def log_message(self, format, *args) -> None:
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # ---- plumbing -----------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own errors (malformed request line, unsupported method) as JSON too."""
        self.close_connection = True
        try:
            self._json({"error": message or HTTPStatus(code).phrase}, code)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _body(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HttpError(400, "bad Content-Length") from None
        if n > MAX_BODY:
            raise HttpError(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(n) if n else b"{}"
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HttpError(400, "request body is not valid JSON") from None
        if not isinstance(obj, dict):
            raise HttpError(400, "request body must be a JSON object")
        return obj

    def _authorised(self, query: dict) -> bool:
        given = self.headers.get("X-Drgn-Token") or query.get("token", "")
        return hmac.compare_digest(str(given).encode(), self.app.token.encode())

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            if not self._authorised(query):
                raise HttpError(403, "forbidden: this server needs the token printed with its URL")
            route = parts.path.rstrip("/") or "/"
            fn = getattr(self, f"{method}_{route.strip('/').replace('/', '_') or 'index'}", None)
            if route.startswith("/static/"):
                return self._static(route.removeprefix("/static/"))
            if fn is None:
                raise HttpError(404, f"no such endpoint: {method} {route}")
            body = self._body() if method == "post" else {}
            return fn(query, body) if method == "post" else fn(query)
        except HttpError as e:
            self._json({"error": str(e)}, e.status)
        except DrgnError as e:
            self._json({"error": str(e)}, 400)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug must still answer in JSON, not a traceback page
            traceback.print_exc(file=sys.stderr)
            self._json({"error": f"internal error ({type(e).__name__}: {e})"}, 500)

    def do_GET(self) -> None:
        self._dispatch("get")

    def do_POST(self) -> None:
        self._dispatch("post")

    def _static(self, name: str) -> None:
        if name not in STATIC:
            raise HttpError(404, f"no such file: {name}")
        body = resources.files("drgn_core.explore").joinpath("static", name).read_bytes()
        self._send(200, body, STATIC[name])

    # ---- the page and its data ----------------------------------------------------------------------
    def get_index(self, q) -> None:
        """The page, with the token in its own script and style links (they need it like every request)."""
        html = resources.files("drgn_core.explore").joinpath("static", "index.html").read_text()
        self._send(200, html.replace("{{TOKEN}}", self.app.token).encode(), STATIC["index.html"])

    def get_api_meta(self, q) -> None:
        meta = self.app.data.meta()
        meta["out"] = str(self.app.out_dir)
        self._json(meta)

    def get_api_points(self, q) -> None:
        """float32 x, y, colour of the drawn subsample, back to back (3 × n_sample × 4 bytes)."""
        d = self.app.data
        s = d.sample
        arrs = [d.column(q.get(k, ""))[s] for k in ("x", "y", "c")]
        self._send(200, b"".join(np.ascontiguousarray(a, np.float32).tobytes() for a in arrs),
                   "application/octet-stream")

    def get_api_sample(self, q) -> None:
        """int32 run positions of the drawn points, in drawing order (the page maps a point to a particle)."""
        self._send(200, self.app.data.sample.astype(np.int32).tobytes(), "application/octet-stream")

    def get_api_hist(self, q) -> None:
        """Histogram of a column over ALL particles."""
        v = self.app.data.column(q.get("col", ""))
        bins = _int(q, "bins", 2, 1000) if "bins" in q else 80
        finite = v[np.isfinite(v)]
        counts, edges = np.histogram(finite, bins=bins)
        self._json({"col": q["col"], "counts": counts.tolist(), "edges": edges.tolist(),
                    "n": int(finite.size)})

    def post_api_select(self, q, body) -> None:
        """Count of a selection over all particles, and which drawn points it holds (bit mask)."""
        _, mask = self.app.mask(body.get("selection"))
        packed = np.packbits(mask[self.app.data.sample], bitorder="little")
        self._json({"count": int(mask.sum()), "n": self.app.data.n,
                    "sample_mask": base64.b64encode(packed.tobytes()).decode()})

    def get_api_particle(self, q) -> None:
        d = self.app.data
        p = _int(q, "pos", 0, d.n - 1)
        values = {k: float(v[p]) for k, v in d.columns.items()}
        self._json({"pos": p, "row": int(d.indices[p]), "values": values})

    def get_api_image(self, q) -> None:
        d = self.app.data
        p = _int(q, "pos", 0, d.n - 1)
        if d.table is None:
            raise HttpError(404, "the run's particle table is not available (pass --table), so no images")
        from drgn_core.io.images import read_images

        img = read_images(d.table, np.array([d.indices[p]]))[0]
        self._send(200, _png(img), "image/png")

    def post_api_montage(self, q, body) -> None:
        """PNG tiling up to 64 particles of the selection (a seeded random choice, in table order)."""
        d = self.app.data
        if d.table is None:
            raise HttpError(404, "the run's particle table is not available (pass --table), so no images")
        _, mask = self.app.mask(body.get("selection"))
        pos = np.nonzero(mask)[0]
        if pos.size == 0:
            raise HttpError(400, "the selection is empty")
        k = min(_int(body, "n", 1, MONTAGE_MAX) if "n" in body else 36, pos.size)
        pick = np.sort(np.random.default_rng(self.app.seed).choice(pos, size=k, replace=False))
        from drgn_core.io.images import read_images

        imgs = read_images(d.table, d.indices[pick])
        cols = int(np.ceil(np.sqrt(k)))
        rows = int(np.ceil(k / cols))
        D = imgs.shape[-1]
        tile = np.zeros((rows * D, cols * D), dtype=np.float32)
        for i, im in enumerate(imgs):
            lo, hi = np.percentile(im, [1, 99])
            r, c = divmod(i, cols)
            scaled = np.clip((im - lo) / max(hi - lo, 1e-12), 0, 1)
            tile[(rows - 1 - r) * D:(rows - r) * D, c * D:(c + 1) * D] = scaled
        self._send(200, _png(tile), "image/png")

    # ---- selections on disk -------------------------------------------------------------------------
    def post_api_save(self, q, body) -> None:
        spec, mask = self.app.mask(body.get("selection"))
        name = sel.check_name(body.get("name"))
        rec = sel.save_selection(self.app.data, spec, mask, self.app.out_dir / "selections", name)
        self._json({"record": rec, "path": str(self.app.out_dir / "selections" / f"{name}.ind.npy")})

    def get_api_selections(self, q) -> None:
        folder = self.app.out_dir / "selections"
        names = sorted(p.name for p in folder.glob("*.ind.npy")) if folder.is_dir() else []
        self._json({"selections": [f"selections/{n}" for n in names]})

    def post_api_load(self, q, body) -> None:
        path = self.app.confine(body.get("path"))
        if not path.name.endswith(".npy") and not path.name.endswith(".txt"):
            raise HttpError(400, "a saved selection is an index file (.npy or .txt)")
        mask, record = sel.load_selection(self.app.data, path)
        spec = {"shapes": [{"op": "add", "kind": "saved", "path": str(path)}], "thresholds": {}}
        self._json({"count": int(mask.sum()), "record": record, "selection": spec})

    def post_api_export(self, q, body) -> None:
        """The selection through drgn export: STAR subset or .cs + .csg, uids.txt, indices."""
        from drgn_core.export import export_subset

        d = self.app.data
        if d.table is None:
            raise HttpError(400, "the run's particle table is not available (pass --table), so no export")
        spec, mask = self.app.mask(body.get("selection"))
        name = sel.check_name(body.get("name"))
        if not mask.any():
            raise HttpError(400, "the selection is empty; nothing to export")
        outdir = self.app.out_dir / "exports" / name
        summary = export_subset(d.table, np.sort(d.indices[mask]), outdir, name=name)
        with atomic_path(outdir / "export.json") as tmp:
            tmp.write_text(json.dumps({**summary, "selection": spec}, indent=1) + "\n")
        self._json(summary)

    # ---- volumes --------------------------------------------------------------------------------------
    def _latent(self, body: dict) -> tuple[np.ndarray, str]:
        d = self.app.data
        kind = body.get("kind")
        if kind == "point":
            p = _int(body, "pos", 0, d.n - 1)
            return d.z[p], f"particle row {int(d.indices[p])}"
        if kind == "mean":
            _, mask = self.app.mask(body.get("selection"))
            if not mask.any():
                raise HttpError(400, "the selection is empty; it has no mean latent")
            return d.z[mask].mean(0), f"mean of {int(mask.sum())} particles"
        if kind == "kmeans":
            if d.kmeans_centres is None:
                raise HttpError(400, "no k-means centres: the run has no drgn analyze folder "
                                     "(pass --analysis)")
            k = _int(body, "k", 0, len(d.kmeans_centres) - 1)
            return d.kmeans_centres[k], f"k-means centre {k}"
        if kind == "z":
            z = body.get("z")
            if not isinstance(z, list) or len(z) != d.zdim:
                raise HttpError(400, f"'z' must list {d.zdim} numbers")
            return np.array([sel._as_float(v, "z") for v in z], dtype=np.float32), "given z"
        raise HttpError(400, "kind must be one of point, mean, kmeans, z")

    def post_api_volume(self, q, body) -> None:
        z, label = self._latent(body)
        D = _int(body, "D", 4, 512) if body.get("D") else self.app.view_box()
        if D % 2:
            raise HttpError(400, f"D must be even, got {D}")
        m = self.app.maps.decode(z, label, D=D, exact=False)
        self._json({**m.info(), "decoded_total": self.app.maps.decoded})

    def get_api_mesh(self, q) -> None:
        m = self.app.maps.get(q.get("id", ""))
        self._send(200, mesh_bytes(m, _float(q, "level")), "application/octet-stream")

    def post_api_volume_save(self, q, body) -> None:
        m = self.app.maps.get(str(body.get("id", "")))
        name = sel.check_name(body.get("name"))
        D = _int(body, "D", 4, 512) if body.get("D") else self.app.box()
        if m.decoded and (m.volume.shape[-1] != D or not m.exact):  # viewed smaller or in bf16: decode again
            m = self.app.maps.decode(m.z, m.label, D=D, exact=True)
        path = save_map(m, self.app.out_dir / "volumes" / f"{name}.mrc")
        self._json({"path": str(path), "apix": m.apix, "D": int(m.volume.shape[-1])})

    def post_api_state_map(self, q, body) -> None:
        """The mean map of landscape state k (states/state_k/mean.mrc of the landscape folder), for viewing
        and saving like a decoded map; its latent is the mean z of the state's particles."""
        from drgn_core.explore.volumes import add_map
        from drgn_core.io.mrc import read_mrc

        d = self.app.data
        if d.landscape_dir is None:
            raise HttpError(400, "no landscape states: the run has no drgn landscape folder (--landscape)")
        k = _int(body, "k", 0, d.n_states - 1)
        vol, apix = read_mrc(Path(d.landscape_dir) / "states" / f"state_{k}" / "mean.mrc", mmap=False)
        in_state = d.column("state") == k
        z = d.z[in_state].mean(0) if in_state.any() else np.zeros(d.zdim, np.float32)
        m = add_map(self.app.maps, vol, apix, f"state {k} mean map ({int(in_state.sum())} particles)", z)
        self._json(m.info())

    def get_api_kmeans(self, q) -> None:
        d = self.app.data
        if d.kmeans_centres is None:
            return self._json({"centres": []})
        rows = d.kmeans_rows if d.kmeans_rows is not None else []
        self._json({"centres": [{"k": i, "pos": int(rows[i]) if len(rows) else None}
                                for i in range(len(d.kmeans_centres))]})

    def post_api_coords(self, q, body) -> None:
        d = self.app.data
        pos = body.get("pos")
        if not isinstance(pos, list) or not all(isinstance(p, int) and 0 <= p < d.n for p in pos):
            raise HttpError(400, f"'pos' must list particle positions 0 … {d.n - 1}")
        x, y = d.column(str(body.get("x"))), d.column(str(body.get("y")))
        self._json({"x": [float(x[p]) for p in pos], "y": [float(y[p]) for p in pos]})

    # ---- traversal ------------------------------------------------------------------------------------
    def post_api_traverse(self, q, body) -> None:
        """Shortest path in the latent graph through the anchors (positions), optionally its maps."""
        from drgn_core.traversal import graph_path

        d = self.app.data
        anchors = body.get("anchors")
        if not isinstance(anchors, list) or len(anchors) < 2 or not all(
                isinstance(a, int) and 0 <= a < d.n for a in anchors):
            raise HttpError(400, f"'anchors' must list at least 2 particle positions 0 … {d.n - 1}")
        path, cum = graph_path(self.app.graph(), anchors, names=[int(d.indices[a]) for a in anchors])
        out = {"path": path.tolist(), "distance": cum.tolist(), "rows": d.indices[path].tolist()}
        n_vol = _int(body, "n_volumes", 0, 100) if body.get("n_volumes") is not None else 0
        if n_vol:
            from drgn_core.plots import even_subsample
            from drgn_core.volumes import write_volume_series

            name = sel.check_name(body.get("name") or "traversal")
            picks = path[even_subsample(len(path), n_vol)]
            maps = [self.app.maps.decode(d.z[p], f"path particle row {int(d.indices[p])}", D=self.app.box())
                    for p in picks]
            folder = self.app.out_dir / "traversals" / name
            write_volume_series(np.stack([m.volume for m in maps]), d.z[picks], folder, maps[0].apix)
            out.update({"maps": [m.info() for m in maps], "folder": str(folder)})
        self._json(out)


def make_server(app: Explorer, host: str = "127.0.0.1", port: int = 0, verbose: bool = False
                ) -> ThreadingHTTPServer:
    """A bound (not yet serving) server for `app`; port 0 picks a free port."""
    handler = type("ExploreHandler", (Handler,), {"app": app})
    try:
        srv = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise DrgnError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    srv.daemon_threads = True
    srv.verbose = verbose
    return srv


def url_of(srv: ThreadingHTTPServer, app: Explorer) -> str:
    host, port = srv.server_address[:2]
    # a wildcard bind (only when the user asked for one) is reached at loopback from this machine
    try:
        wildcard = not host or ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        wildcard = False
    shown = "127.0.0.1" if wildcard else host
    return f"http://{shown}:{port}/?token={app.token}"

