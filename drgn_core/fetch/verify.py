"""What makes a fetched file complete, and the sha256 manifest that remembers it.

EMPIAR publishes no checksums, so a file is accepted when its size equals the server's and, for MRC
files, when the header implies exactly that size (1024 + extended header + nx·ny·nz·bytes per voxel): a
truncated or padded stack is caught even where the server itself serves a damaged copy. Once accepted, its
sha256 goes into `drgn-fetch-manifest.json` in the output folder; later runs check the file against it,
so a copy changed on disk afterwards is noticed instead of silently trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path

from drgn_core.errors import DrgnError
from drgn_core.io.atomic import atomic_path

MANIFEST = "drgn-fetch-manifest.json"

# Bytes per voxel of the MRC modes (mode 101 is 4-bit, two voxels per byte).
MODE_BYTES = {0: 1.0, 1: 2.0, 2: 4.0, 3: 4.0, 4: 8.0, 6: 2.0, 12: 2.0, 101: 0.5}


def is_mrc_name(name: str) -> bool:
    return name.lower().endswith((".mrc", ".mrcs", ".st", ".map"))


def mrc_expected_size(header: bytes) -> int | None:
    """File size the 1024-byte MRC header implies, or None when the header is not a readable MRC header.

    The byte order comes from the machine stamp (0x44 = little, 0x11 = big endian); files without a
    stamp are tried little endian first, as most writers are.
    """
    if len(header) < 1024:
        return None
    stamp = header[212]
    orders = [">"] if stamp == 0x11 else ["<"] if stamp == 0x44 else ["<", ">"]
    for o in orders:
        nx, ny, nz, mode = struct.unpack(o + "4i", header[:16])
        nsymbt = struct.unpack(o + "i", header[92:96])[0]
        if mode in MODE_BYTES and nx > 0 and ny > 0 and nz > 0 and nsymbt >= 0:
            voxels = nx * ny * nz
            data = int(voxels * MODE_BYTES[mode] + 0.5) if mode == 101 else int(voxels * MODE_BYTES[mode])
            return 1024 + nsymbt + data
    return None


def check_mrc(path: Path, name: str, size: int) -> None:
    """Raise unless the MRC header of `path` implies exactly `size` bytes."""
    with open(path, "rb") as f:
        header = f.read(1024)
    expected = mrc_expected_size(header)
    if expected is None:
        raise DrgnError(f"{name}: the server's copy has no valid MRC header; not accepted as complete")
    if expected != size:
        raise DrgnError(f"{name}: its MRC header implies {expected} bytes but the server's file has {size}; "
                        "the server's copy is truncated or padded, so it is not accepted")


def sha256_file(path: str | os.PathLike, block: int = 1 << 22, progress=None) -> str:
    """Hex sha256 of a file; `progress(n)` is called with each block's size (for a progress bar)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def git_blob_id(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """Git's blob id: SHA-1 of b'blob <size>\\0' + content (what a GitHub tree lists for each file)."""
    h = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def parse_checksum(text: str) -> tuple[str, str]:
    """('sha256' | 'git', hex) from 'sha256:HEX' or 'git:HEX' (a bare 64-hex string counts as sha256)."""
    kind, _, value = text.partition(":")
    if not value:
        kind, value = ("sha256", text) if len(text) == 64 else ("", text)
    kind = kind.lower()
    want = {"sha256": 64, "git": 40}
    if kind not in want or len(value) != want[kind] or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise DrgnError(f"checksum {text!r} is not 'sha256:<64 hex>' or 'git:<40 hex>' (a git blob id)")
    return kind, value.lower()


def compute_checksum(path: str | os.PathLike, kind: str) -> str:
    return sha256_file(path) if kind == "sha256" else git_blob_id(path)


class Manifest:
    """The output folder's record of complete files: relative path -> {size, sha256, url}.

    Rewritten atomically after each file completes (from several download threads, hence the lock), so a
    kill never leaves it half-written and never lists a file that is not in place.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / MANIFEST
        self.files: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
                self.files = dict(doc["files"])
            except (ValueError, KeyError, TypeError) as e:
                raise DrgnError(f"{self.path}: not a drgn fetch manifest ({e}); move it aside to start "
                                "afresh") from None

    def add(self, rel: str, size: int, sha256: str, url: str) -> None:
        with self._lock:
            self.files[rel] = {"size": size, "sha256": sha256, "url": url}
            self._write()

    def _write(self) -> None:
        doc = {"format": "drgn-fetch-manifest/1", "files": dict(sorted(self.files.items()))}
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(doc, indent=1) + "\n")

    def check(self, rel: str, path: Path, progress=None) -> str | None:
        """None when `path` matches its record; else why not (the message names the file)."""
        rec = self.files.get(rel)
        if rec is None:
            return None
        size = path.stat().st_size
        if size != rec["size"]:
            return (f"{path}: {size} bytes on disk but {rec['size']} when it was fetched "
                    f"(manifest {self.path})")
        if sha256_file(path, progress=progress) != rec["sha256"]:
            return f"{path}: sha256 differs from the one recorded when it was fetched (manifest {self.path})"
        return None
