"""Parallel, resumable Range downloads over a bounded pool of connections.

Every file is cut into chunks; chunks of all files share one pool of at most `connections` workers (EBI
throttles above about 8 connections per client, and each connection alone gets about 1.5 MB/s). Each file
is written to `.NAME.part` beside its target, and `.NAME.part.idx` records, per chunk, how many bytes from
the chunk's start are on disk: the data is written first and the 8-byte counter after it, in place, so a
kill -9 at any moment loses at most the piece in flight and never claims bytes that are not there. A file
is renamed to its name only when every chunk is in and the checks of `verify` pass.

A 503, a dropped connection, a short body (a wrong Content-Length) or a timeout is retried with
exponential back-off; the retry budget resets whenever bytes arrive. A 404, a file whose size changes
mid-way, and a full disk stop the whole fetch with one line naming the URL or file; the partial data is
kept, and the next run resumes it.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import shutil
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from drgn_core.errors import DrgnError
from drgn_core.fetch.connections import LIMIT, folder_lock
from drgn_core.fetch.verify import Manifest, check_mrc, compute_checksum, is_mrc_name, sha256_file

IDX_HEADER = 512  # bytes of JSON header (space padded) before the per-chunk counters
PIECE = 1 << 16  # bytes read and recorded at a time: the most a kill -9 can lose per connection
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@dataclass
class RemoteFile:
    """A file to fetch: where it goes (relative to the output folder), where it comes from, and what we
    know of it (the server's size once probed; an expected checksum for published inputs)."""

    rel: str
    url: str
    size: int | None = None
    checksum: tuple[str, str] | None = None


@dataclass
class FetchOptions:
    connections: int = 8
    chunk_size: int = 8 << 20
    retries: int = 8
    backoff: float = 1.0
    max_backoff: float = 60.0
    timeout: float = 60.0
    progress: bool = True
    verify_existing: bool = True
    repair: bool = False


MIN_CHUNK = 256 << 10


def chunk_for(size: int, chunk_size: int, connections: int) -> int:
    """Bytes per Range request for a file of `size`: at most `chunk_size`, and small enough that a lone
    file still spreads over every connection (16 requests per connection) down to 256 KiB. The tail of a
    fetch, and the cost of a resume, is about one chunk at one connection's rate; a 50 GB stack still gets
    the full chunk size, so requests stay few.
    """
    return int(min(chunk_size, max(MIN_CHUNK, size // (16 * max(1, connections)))))


class _Transient(Exception):
    """A failure worth retrying (503, dropped connection, short body, timeout)."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


def _open_range(url: str, start: int | None, end: int | None, timeout: float, method: str = "GET"):
    headers = {"User-Agent": "drgnflow-fetch"}
    if start is not None:
        headers["Range"] = f"bytes={start}-{end - 1}"
    req = urllib.request.Request(url, headers=headers, method=method)
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 404:
            raise DrgnError(f"{url}: not found on the server (HTTP 404)") from None
        if e.code == 416:
            raise DrgnError(f"{url}: the server refuses the byte range {start}-{end} (HTTP 416); the file "
                            "shrank on the server; run again to fetch it afresh") from None
        if e.code in (408, 429) or e.code >= 500:
            after = e.headers.get("Retry-After") if e.headers else None
            wait_s = float(after) if after and after.strip().isdigit() else None
            raise _Transient(f"HTTP {e.code} {e.reason}", wait_s) from None
        raise DrgnError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise _Transient(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None


def _retrying(fn, url: str, opts: FetchOptions):
    """Call fn() until it returns, retrying _Transient failures with exponential back-off."""
    failures = 0
    while True:
        try:
            return fn()
        except _Transient as e:
            failures += 1
            if failures > opts.retries:
                raise DrgnError(f"{url}: gave up after {opts.retries} retries ({e}); run again to "
                                "resume") from None
            time.sleep(e.wait if e.wait is not None else min(opts.backoff * 2 ** (failures - 1),
                                                             opts.max_backoff))


def probe_size(url: str, opts: FetchOptions) -> int:
    """The server's exact size of `url`: Content-Length of a HEAD, else the total of a 1-byte Range."""

    def once() -> int:
        with LIMIT.slot(), _open_range(url, None, None, opts.timeout, method="HEAD") as r:
            length = r.headers.get("Content-Length")
        if length is not None and length.strip().isdigit():
            return int(length)
        with LIMIT.slot(), _open_range(url, 0, 1, opts.timeout) as r:
            total = _content_range_total(r.headers.get("Content-Range"))
        if total is None:
            raise DrgnError(f"{url}: the server gives no size (no Content-Length, no Content-Range)")
        return total

    return _retrying(once, url, opts)


def _content_range_total(value: str | None) -> int | None:
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _content_range_start(value: str | None) -> int | None:
    try:
        return int(value.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


class Partial:
    """A file being fetched: the `.part` data file and its `.part.idx` progress index."""

    def __init__(self, target: Path, remote: RemoteFile, chunk_size: int) -> None:
        self.target = target
        self.remote = remote
        self.size = int(remote.size)
        self.part = target.with_name(f".{target.name}.part")
        self.idx = target.with_name(f".{target.name}.part.idx")
        # A partial copy of this very file (same URL and size) keeps the chunking it was started with,
        # whatever --chunk-size or --connections say now: its progress counters are per chunk.
        self.chunk = self._recorded_chunk() or chunk_size
        self.n_chunks = max(1, -(-self.size // self.chunk))
        self.done = [0] * self.n_chunks
        self.restarted = False
        header = {"url": remote.url, "size": self.size, "chunk": self.chunk}
        loaded = self._load(header)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not loaded:
            self.restarted = self.idx.exists() or self.part.exists()
            self.done = [0] * self.n_chunks
            with open(self.part, "wb"):
                pass
            blob = json.dumps(header).encode().ljust(IDX_HEADER - 1) + b"\n"
            with open(self.idx, "wb") as f:
                f.write(blob + bytes(8 * self.n_chunks))
        self.fd = os.open(self.part, os.O_RDWR)
        self.idx_fd = os.open(self.idx, os.O_RDWR)
        self.lock = threading.Lock()
        self.finished = False
        self.remaining_chunks = sum(1 for i in range(self.n_chunks) if self.start(i) < self.end(i))

    def _recorded_chunk(self) -> int | None:
        try:
            with open(self.idx, "rb") as f:
                head = json.loads(f.read(IDX_HEADER).decode())
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        ok = (isinstance(head, dict) and head.get("url") == self.remote.url and head.get("size") == self.size
              and isinstance(head.get("chunk"), int) and head["chunk"] > 0)
        return head["chunk"] if ok else None

    def _load(self, header: dict) -> bool:
        """Resume from the index when it describes this very file (same URL, size and chunking)."""
        if not (self.idx.exists() and self.part.exists()):
            return False
        try:
            raw = self.idx.read_bytes()
            if json.loads(raw[:IDX_HEADER].decode()) != header or len(raw) != IDX_HEADER + 8 * self.n_chunks:
                return False
        except (ValueError, UnicodeDecodeError):
            return False
        self.done = list(struct.unpack(f"<{self.n_chunks}Q", raw[IDX_HEADER:]))
        return all(0 <= d <= self.end(i) - i * self.chunk for i, d in enumerate(self.done))

    def start(self, i: int) -> int:
        return i * self.chunk + self.done[i]

    def end(self, i: int) -> int:
        return min((i + 1) * self.chunk, self.size)

    @property
    def bytes_done(self) -> int:
        return sum(self.done)

    def write(self, i: int, offset: int, data: bytes) -> None:
        """Write data at offset (inside chunk i), then advance the chunk's counter: data first, counter
        second, so the index never claims bytes that a kill could have lost."""
        view = memoryview(data)
        while view:
            try:
                # A write can be short (a disk filling up): count only what landed, then retry the rest,
                # which raises the error.
                n = os.pwrite(self.fd, view, offset)
            except OSError as e:
                if e.errno in DISK_FULL:
                    raise DrgnError(f"{self.part}: disk full while writing {self.remote.rel} "
                                    f"({os.strerror(e.errno)}); free some space and run again: the partial "
                                    "data is kept and resumes") from None
                raise DrgnError(f"{self.part}: cannot write ({e.strerror})") from None
            offset += n
            view = view[n:]
            self.done[i] = offset - i * self.chunk
            os.pwrite(self.idx_fd, struct.pack("<Q", self.done[i]), IDX_HEADER + 8 * i)

    def close(self) -> None:
        # Closed once only: a second os.close could hit a descriptor number reused by another file.
        if self.fd >= 0:
            os.close(self.fd)
            os.close(self.idx_fd)
            self.fd = self.idx_fd = -1


def _fetch_chunk(p: Partial, i: int, opts: FetchOptions, stop: threading.Event, bar) -> bool:
    """Fetch chunk i of p until complete; True when it was the file's last missing chunk."""
    url = p.remote.url
    failures = 0
    while p.start(i) < p.end(i):
        if stop.is_set():
            return False
        before = p.start(i)
        try:
            _stream(p, i, opts, stop, bar)
        except _Transient as e:
            failures = 1 if p.start(i) > before else failures + 1
            if failures > opts.retries:
                raise DrgnError(f"{url}: gave up after {opts.retries} retries ({e}); the partial data is "
                                "kept, run again to resume") from None
            time.sleep(e.wait if e.wait is not None else min(opts.backoff * 2 ** (failures - 1),
                                                             opts.max_backoff))
    with p.lock:
        p.remaining_chunks -= 1
        return p.remaining_chunks == 0


def _stream(p: Partial, i: int, opts: FetchOptions, stop: threading.Event, bar) -> None:
    with LIMIT.slot():  # held until the response is closed: the connection limit counts every request
        _stream_held(p, i, opts, stop, bar)


def _stream_held(p: Partial, i: int, opts: FetchOptions, stop: threading.Event, bar) -> None:
    url = p.remote.url
    start, end = p.start(i), p.end(i)
    r = _open_range(url, start, end, opts.timeout)
    try:
        if r.status == 206:
            total = _content_range_total(r.headers.get("Content-Range"))
            if total is not None and total != p.size:
                raise DrgnError(f"{url}: the file's size changed mid-way, from {p.size} to {total} bytes "
                                "(replaced on the server); the partial data is kept, run again to fetch the "
                                "new version")
            if _content_range_start(r.headers.get("Content-Range")) != start:
                raise _Transient(f"server answered range {r.headers.get('Content-Range')!r} for "
                                 f"bytes={start}-{end - 1}")
        elif r.status == 200:
            length = r.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) != p.size:
                raise DrgnError(f"{url}: the file's size changed mid-way, from {p.size} to {length} bytes "
                                "(replaced on the server); the partial data is kept, run again to fetch the "
                                "new version")
            skip = start  # the server ignored Range: read past what we already have
            while skip > 0:
                got = r.read(min(PIECE, skip))
                if not got:
                    raise _Transient("connection closed while skipping to the range start")
                skip -= len(got)
        else:
            raise _Transient(f"unexpected HTTP {r.status}")
        pos = start
        while pos < end and not stop.is_set():
            try:
                # read1: whatever has arrived (up to PIECE) is written at once, so a kill or a dropped
                # connection loses only what is still in the socket, not a half-filled 64 KiB buffer.
                data = r.read1(min(PIECE, end - pos))
            except (http.client.IncompleteRead, http.client.HTTPException, ConnectionError,
                    TimeoutError, OSError) as e:
                raise _Transient(f"connection dropped at byte {pos} ({type(e).__name__})") from None
            if not data:
                break
            p.write(i, pos, data)
            pos += len(data)
            if bar is not None:
                bar.update(len(data))
        if pos < end and not stop.is_set():
            raise _Transient(f"response ended at byte {pos} of {end} (wrong Content-Length or dropped)")
    finally:
        r.close()


def _finish(p: Partial, outdir: Path, manifest: Manifest) -> None:
    """Check a file whose chunks are all in, then rename it into place and record it.

    Exactly one caller finishes a file: the flag is taken under the file's lock, so a second caller (there
    should be none: the last chunk's worker, or the one task of a file that was complete at start) returns
    at once instead of renaming a `.part` that is already gone.
    """
    with p.lock:
        if p.finished:
            return
        p.finished = True
    p.close()
    rel, url = p.remote.rel, p.remote.url
    on_disk = p.part.stat().st_size
    if on_disk != p.size:
        # Only if the partial file was changed behind our back: its index no longer describes it.
        p.idx.unlink()
        raise DrgnError(f"{p.part}: {on_disk} bytes on disk after fetching {p.size} (changed while being "
                        "fetched?); its progress index was reset, run again to fetch it afresh")
    if is_mrc_name(rel):
        check_mrc(p.part, url, p.size)
    digest = None
    if p.remote.checksum is not None:
        kind, want = p.remote.checksum
        got = compute_checksum(p.part, kind)
        if got != want:
            p.part.unlink()
            p.idx.unlink()
            raise DrgnError(f"{url}: {kind} checksum is {got}, expected {want}; the download was deleted "
                            "(the URL serves other content than the one expected)")
        digest = got if kind == "sha256" else None
    digest = digest or sha256_file(p.part)
    os.replace(p.part, p.target)
    p.idx.unlink()
    manifest.add(rel, p.size, digest, url)


def check_existing(files: list[RemoteFile], outdir: Path, manifest: Manifest,
                   opts: FetchOptions) -> tuple[list[RemoteFile], list[tuple[RemoteFile, str]]]:
    """(files still to fetch, (file, problem) for files in place that no longer match the manifest).

    Re-hashing what a finished fetch brought takes minutes for 100 GB (disk speed), hence its own bar.
    """
    from drgn_core.progress import progress_bar

    todo, problems = [], []
    recorded = [f for f in files if f.rel in manifest.files and (outdir / f.rel).exists()]
    bar = progress_bar(total=sum(manifest.files[f.rel]["size"] for f in recorded), unit="B", unit_scale=True,
               unit_divisor=1024, desc="verify", file=sys.stderr,
               disable=not (opts.progress and opts.verify_existing and recorded))
    for f in files:
        target = outdir / f.rel
        if not target.exists():
            todo.append(f)
            continue
        rec = manifest.files.get(f.rel)
        if rec is None:
            todo.append(f)  # in place but never verified by us: probe and check below
            continue
        if f.size is not None and f.size != rec["size"]:
            problems.append((f, f"{target}: {rec['size']} bytes when fetched but the server now has "
                                f"{f.size}"))
            continue
        if opts.verify_existing:
            why = manifest.check(f.rel, target, progress=bar.update)
            if why:
                problems.append((f, why))
                continue
        f.size = rec["size"]
    bar.close()
    return todo, problems


def adopt_or_fetch(f: RemoteFile, outdir: Path, manifest: Manifest) -> bool:
    """A target in place without a manifest record (e.g. killed between rename and record): accept it
    when it passes the completeness checks; True if adopted."""
    target = outdir / f.rel
    if not target.exists() or target.stat().st_size != f.size:
        return False
    try:
        if is_mrc_name(f.rel):
            check_mrc(target, str(target), f.size)
        if f.checksum is not None and compute_checksum(target, f.checksum[0]) != f.checksum[1]:
            return False
    except DrgnError:
        return False
    manifest.add(f.rel, f.size, sha256_file(target), f.url)
    target.with_name(f".{target.name}.part.idx").unlink(missing_ok=True)  # left by a kill after the rename
    return True


def fetch_files(files: list[RemoteFile], outdir: str | os.PathLike, opts: FetchOptions) -> dict:
    """Fetch `files` (sizes probed where unknown) into outdir; returns a summary dict.

    Files recorded in the manifest and unchanged on disk are skipped without any request, so a re-run of
    a finished fetch is a no-op. One process at a time works in a folder (`connections.folder_lock`), and
    every request of this process shares one limit of `opts.connections` connections.
    """
    LIMIT.set(opts.connections)
    with folder_lock(outdir, quiet=not opts.progress):
        return _fetch_locked(files, Path(outdir), opts)


def _fetch_locked(files: list[RemoteFile], outdir: Path, opts: FetchOptions) -> dict:
    from drgn_core.progress import progress_bar

    manifest = Manifest(outdir)
    todo, problems = check_existing(files, outdir, manifest, opts)
    if problems:
        if not opts.repair:
            raise DrgnError(f"{len(problems)} fetched file(s) changed since they were fetched: "
                            + "; ".join(why for _, why in problems[:5])
                            + ("; ..." if len(problems) > 5 else "")
                            + " (run with --repair to fetch them again)")
        for f, why in problems:
            print(f"drgn fetch: {why}; fetching it again", file=sys.stderr)
            (outdir / f.rel).unlink()
            manifest.files.pop(f.rel, None)
            f.size = None
            todo.append(f)
    probe_sizes([f for f in todo if f.size is None], opts)
    todo = [f for f in todo if not adopt_or_fetch(f, outdir, manifest)]
    summary = {"files": len(files), "skipped": len(files) - len(todo), "fetched": len(todo),
               "bytes_total": sum(f.size or 0 for f in files), "bytes_fetched": 0}
    if not todo:
        return summary
    parts = []
    try:
        for f in todo:
            p = Partial(outdir / f.rel, f, chunk_for(int(f.size), opts.chunk_size, opts.connections))
            if p.restarted:
                print(f"drgn fetch: {p.part}: the server's file changed since the partial copy was started; "
                      "fetching it afresh", file=sys.stderr)
            parts.append(p)
        need = sum(p.size - p.bytes_done for p in parts)
        free = shutil.disk_usage(outdir).free
        if need > free:
            raise DrgnError(f"{outdir}: {need / 1e9:.2f} GB still to fetch but only {free / 1e9:.2f} GB free "
                            "on its disk; free space or choose another folder (-o)")
        already = sum(p.bytes_done for p in parts)
        total = sum(p.size for p in parts)
        stop = threading.Event()
        with progress_bar(total=total, initial=already, unit="B", unit_scale=True, unit_divisor=1024,
                  desc="fetch", file=sys.stderr, disable=not opts.progress, smoothing=0.1) as bar, \
                ThreadPoolExecutor(max_workers=max(1, opts.connections)) as pool:

            def task(p: Partial, i: int) -> None:
                if _fetch_chunk(p, i, opts, stop, bar):
                    _finish(p, outdir, manifest)

            futures = []
            for p in parts:
                # Longest remaining first (whole chunks before the tails of interrupted ones): the
                # connections then run out of work together instead of one finishing a chunk alone.
                pending = sorted((i for i in range(p.n_chunks) if p.start(i) < p.end(i)),
                                 key=lambda i, p=p: (p.start(i) - p.end(i), i))
                if not pending:
                    futures.append(pool.submit(_finish, p, outdir, manifest))
                futures += [pool.submit(task, p, i) for i in pending]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            except KeyboardInterrupt:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise errors[0]
        summary["bytes_fetched"] = total - already
    finally:
        for p in parts:
            p.close()
    return summary


def probe_sizes(files: list[RemoteFile], opts: FetchOptions) -> None:
    """Fill in the server's size of each file, with the same bounded pool of connections."""
    if not files:
        return
    with ThreadPoolExecutor(max_workers=max(1, opts.connections)) as pool:
        for f, size in zip(files, pool.map(lambda f: probe_size(f.url, opts), files)):
            f.size = size
