"""A loopback server that behaves like EMPIAR, for `drgn fetch` tests and bench/fetch_parallel.py.

It serves `/api/entry/EMPIAR-N/` (JSON with loose types, as EBI does: sizes and counts as strings) and
`/data/N/...` (Apache-style HTML listings; files with HEAD and Range support), binds 127.0.0.1 on an
ephemeral port, and shuts itself down after `lifetime` seconds if a test forgets to. Misbehaviours are
switched on per instance: 503 above `max_connections` concurrent requests, a per-connection rate limit,
a listing that omits a file once, a connection dropped mid-file once, a wrong Content-Length once, a file
replaced (new size) after some bytes were served. It counts the file bytes it sends, in all (`bytes_sent`)
and per file (`served`), and its largest number of requests in progress at once (`peak`): a request counts
from its arrival until just before its last byte goes out, so a client that opens its next request as soon
as it has read a response is not counted twice.
"""

from __future__ import annotations

import html
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeEmpiar:
    def __init__(self, root: str | Path, entries: dict[str, dict], *, max_connections: int = 8,
                 rate: float | None = None, lifetime: float = 300.0) -> None:
        self.root = Path(root)  # files at root/<number>/<path>
        self.entries = entries  # "EMPIAR-N" -> API body
        self.max_connections = max_connections
        self.rate = rate  # bytes/s per connection, None = unlimited
        self.block = 16384  # bytes per write: what a client killed mid-transfer loses per connection
        self.omit_once: set[str] = set()  # "N/data/x" omitted from the next listing that would show it
        self.drop_once: dict[str, int] = {}  # "N/data/x" -> drop after this many body bytes, once
        self.bad_length_once: set[str] = set()  # claim 4096 more bytes than sent, once
        self.replace_after: dict[str, tuple[int, bytes]] = {}  # swap content once this many bytes went out
        self.bytes_sent = 0
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.refused = 0
        self.peak = 0
        self._active = 0
        self._lock = threading.Lock()
        self.served: dict[str, int] = {}  # "N/data/x" -> file bytes sent
        handler = type("Handler", (_Handler,), {"app": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.api_base = f"http://127.0.0.1:{self.port}/api"
        self.data_base = f"http://127.0.0.1:{self.port}/data"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def __enter__(self) -> FakeEmpiar:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    app: FakeEmpiar
    # Without TCP_NODELAY, Nagle's algorithm and the client's delayed ACK add ~40 ms to every response
    # (headers and body go out as separate writes): an artefact no real server shows.
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        app = self.app
        with app._lock:
            app.requests.append((self.command, self.path, self.headers.get("Range")))
            app._active += 1
            app.peak = max(app.peak, app._active)
            busy = app._active > app.max_connections
            if busy:
                app.refused += 1
        try:
            if busy:
                self._plain(503, "Service Temporarily Unavailable")
                return
            path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
            if path.startswith("/api/entry/"):
                self._api(path[len("/api/entry/"):].strip("/"))
            elif path.startswith("/data/"):
                self._data(path[len("/data/"):], head)
            else:
                self._plain(404, "Not Found")
        finally:
            self._release()
            self._released = False

    def _release(self) -> None:
        """Stop counting this request (once): called just before its last byte goes out."""
        if not getattr(self, "_released", False):
            with self.app._lock:
                self.app._active -= 1
            self._released = True

    def _plain(self, code: int, text: str, ctype: str = "text/plain") -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if self.command == "HEAD" or not body:
            self._release()
        self.end_headers()
        if self.command != "HEAD" and body:
            self._release()
            self.wfile.write(body)

    def _api(self, acc: str) -> None:
        key = acc if acc.upper().startswith("EMPIAR-") else f"EMPIAR-{acc}"
        body = self.app.entries.get(key.upper())
        if body is None:
            self._plain(404, json.dumps({"detail": "Not found."}), "application/json")
        else:
            self._plain(200, json.dumps({key.upper(): body}), "application/json")

    def _data(self, rel: str, head: bool) -> None:
        app = self.app
        target = app.root / rel
        if rel.endswith("/") or rel == "" or target.is_dir():
            if not target.is_dir():
                self._plain(404, "Not Found")
                return
            self._listing(rel.rstrip("/"), target)
            return
        if not target.is_file():
            self._plain(404, "Not Found", "text/html")
            return
        key = rel.strip("/")
        size = target.stat().st_size
        start, end = 0, size
        rng = self.headers.get("Range")
        partial = False
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a)
            end = min(int(b) + 1, size) if b else size
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self._release()
                self.end_headers()
                return
            partial = True
        with open(target, "rb") as f:  # only the range: the bench serves a 24 MB file in 1/4 MB pieces
            f.seek(start)
            body = f.read(end - start)
        claimed = len(body)
        drop_at = None
        with app._lock:
            if not head and key in app.bad_length_once:
                app.bad_length_once.discard(key)
                claimed += 4096
            if not head and key in app.drop_once and app.drop_once[key] < len(body):
                drop_at = app.drop_once.pop(key)
        self.send_response(206 if partial else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(claimed))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        if head or not body:
            self._release()
        self.end_headers()
        if head:
            return
        limit = len(body) if drop_at is None else drop_at
        block = app.block
        t0 = time.monotonic()
        sent = 0
        try:
            while sent < limit:
                piece = body[sent:min(sent + block, limit)]
                if sent + len(piece) >= len(body):
                    # The connection stops counting before its last byte goes out: a client that reads
                    # that byte and opens its next request at once must not see a spurious 503.
                    self._release()
                self.wfile.write(piece)
                sent += len(piece)
                with app._lock:
                    app.bytes_sent += len(piece)
                    app.served[key] = app.served.get(key, 0) + len(piece)
                    swap = app.replace_after.get(key)
                    if swap and app.served[key] >= swap[0]:
                        del app.replace_after[key]
                        target.write_bytes(swap[1])
                if app.rate:
                    ahead = sent / app.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        if drop_at is not None or claimed != len(body):
            self._release()
            self.close_connection = True
            self.connection.shutdown(2)  # a drop: the client sees fewer bytes than announced

    def _listing(self, rel: str, folder: Path) -> None:
        app = self.app
        rows = []
        for p in sorted(folder.iterdir()):
            key = f"{rel}/{p.name}".strip("/")
            with app._lock:
                if key in app.omit_once:
                    app.omit_once.discard(key)
                    continue
            name = p.name + ("/" if p.is_dir() else "")
            size = "-" if p.is_dir() else f"{p.stat().st_size / 1024:.0f}K"
            rows.append(f'<tr><td><a href="{urllib.parse.quote(name)}">{html.escape(name)}</a></td>'
                        f'<td align="right">2019-01-01 12:00  </td><td align="right">{size}</td></tr>')
        page = ("<!DOCTYPE HTML PUBLIC \"-//W3C//DTD HTML 3.2 Final//EN\"><html><head><title>Index of /"
                f"{html.escape(rel)}</title></head><body><h1>Index of /{html.escape(rel)}</h1><table>"
                '<tr><th><a href="?C=N;O=D">Name</a></th><th><a href="?C=M;O=A">Last modified</a></th>'
                '<th><a href="?C=S;O=A">Size</a></th></tr>'
                '<tr><td><a href="/empiar/world_availability/">Parent Directory</a></td></tr>'
                + "".join(rows) + "</table></body></html>")
        self._plain(200, page, "text/html;charset=UTF-8")


def api_body(number: str, *, status: str = "REL", n_images: int | str = "1000") -> dict:
    """An entry as EBI's API answers it: sizes, counts and pixel sizes as strings."""
    return {
        "title": f"Test entry {number}",
        "status": status,
        "release_date": "2019-01-01",
        "dataset_size": "12.3 MB",
        "cross_references": [{"name": "EMD-0000"}],
        "imagesets": [{"name": "particles", "directory": "data", "category": "picked particles",
                       "header_format": "MRC", "data_format": "MRCS",
                       "num_images_or_tilt_series": n_images, "frames_per_image": "1",
                       "voxel_type": "32 BIT FLOAT", "pixel_width": "1.31", "pixel_height": 1.31,
                       "image_width": "64", "image_height": "64", "details": ""}],
    }


def _serve_main() -> None:
    """`python tests/empiar_server.py ROOT [RATE]`: serve ROOT in a process of its own (the bench uses it,
    so the server's threads do not share the client's interpreter lock); prints the port, stops when
    stdin closes or after ten minutes."""
    import sys

    rate = float(sys.argv[2]) if len(sys.argv) > 2 else None
    with FakeEmpiar(sys.argv[1], {}, rate=rate, lifetime=600) as srv:
        print(srv.port, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    _serve_main()
