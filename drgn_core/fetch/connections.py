"""One process-wide limit on open connections, and one fetch process per output folder.

EBI answers 503 above about 8 connections from one client. A limit that only bounds the download pool is
not enough: the API call, directory listings, the HEAD requests that probe sizes and every retry open
connections too, and before this module some of them ran beside the pool. Every request the fetch makes
therefore holds a slot of `LIMIT` from the moment it opens its connection until it has closed it; waiting
for a retry (back-off) holds none.

A second `drgn fetch` into the same folder (a workflow rerun while the fetch of a killed run still goes on,
two terminals) would fetch the same chunks twice and finish the same files twice (the rename of one
process pulls the `.part` away from under the other). `folder_lock` makes the second one wait for the
first: an advisory `flock` on `<folder>/.drgn-fetch.lock`, released by the kernel when its holder exits,
however it exits (kill -9 included), so no stale lock ever needs a hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".drgn-fetch.lock"


class ConnectionLimit:
    """A counting semaphore whose size can be set once the command line is read."""

    def __init__(self, n: int = 8) -> None:
        self._cond = threading.Condition()
        self._limit = n
        self._open = 0
        self.peak = 0

    def set(self, n: int) -> None:
        with self._cond:
            self._limit = max(1, int(n))
            self._cond.notify_all()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one connection for the body of the `with` (open, read, close)."""
        with self._cond:
            while self._open >= self._limit:
                self._cond.wait()
            self._open += 1
            self.peak = max(self.peak, self._open)
        try:
            yield
        finally:
            with self._cond:
                self._open -= 1
                self._cond.notify()


LIMIT = ConnectionLimit()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, quiet: bool = False) -> Iterator[None]:
    """Hold the output folder's fetch lock, waiting (with a note) while another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                print(f"drgn fetch: {folder}: another drgn fetch is working in this folder; waiting for it "
                      "to finish", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
