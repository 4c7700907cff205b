"""Walking an Apache-style HTTPS directory listing, and matching it against include globs.

EMPIAR's HTTPS channel serves one HTML page per folder. We read only the links (names ending in `/` are
folders); the sizes shown there are rounded ("1.2G"), so exact sizes come from the server per file
(`download.probe`). Folders that no include pattern can reach are not walked: 10028 alone has 1,081
stacks in two folders, and a full walk of a large entry costs one request per folder.
"""

from __future__ import annotations

import fnmatch
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser

from drgn_core.errors import DrgnError
from drgn_core.fetch.connections import LIMIT

GLOB_CHARS = set("*?[")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)


def parse_listing(html: str) -> tuple[list[str], list[str]]:
    """(files, folders) named by the links of one listing page; sort links, parents and absolute links
    are skipped, and names are URL-decoded. Folders keep no trailing slash."""
    p = _Links()
    p.feed(html)
    files, folders = [], []
    for href in p.hrefs:
        if href.startswith(("?", "/", "#")) or "://" in href or href.startswith("../") or href == "./":
            continue
        name = urllib.parse.unquote(href.split("?")[0])
        if name.endswith("/"):
            name = name[:-1]
            if name and "/" not in name:
                folders.append(name)
        elif name and "/" not in name:
            files.append(name)
    return files, folders


def _literal_prefix(pattern: str) -> str:
    """The folder part of a pattern before its first glob character ('data/Particles/' of
    'data/Particles/MRC_*/x.mrcs')."""
    cut = len(pattern)
    for i, ch in enumerate(pattern):
        if ch in GLOB_CHARS:
            cut = i
            break
    head = pattern[:cut]
    return head[: head.rfind("/") + 1] if cut < len(pattern) else pattern


def could_contain(folder: str, patterns: list[str]) -> bool:
    """Whether any pattern can match a path inside `folder` (relative, no trailing slash)."""
    if not patterns:
        return True
    f = folder + "/"
    for pat in patterns:
        prefix = _literal_prefix(pat)
        if f.startswith(prefix) or prefix.startswith(f):
            return True
    return False


def matches(path: str, patterns: list[str]) -> bool:
    """fnmatch semantics: `*` also crosses '/', so 'data/L17*' matches everything under data/ that
    begins with L17, and 'data/*' the whole data folder."""
    return not patterns or any(fnmatch.fnmatchcase(path, p) for p in patterns)


def is_literal(pattern: str) -> bool:
    return not (set(pattern) & GLOB_CHARS)


def read_page(url: str, timeout: float = 60.0) -> str:
    try:
        with LIMIT.slot(), urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        raise DrgnError(f"{url}: cannot read the directory listing (HTTP {e.code} {e.reason})") from None
    except (urllib.error.URLError, OSError) as e:
        raise DrgnError(f"{url}: cannot read the directory listing ({getattr(e, 'reason', e)})") from None


def walk(root_url: str, patterns: list[str], timeout: float = 60.0) -> list[str]:
    """Relative paths of every file under `root_url` (a folder URL) that matches `patterns`, sorted."""
    root_url = root_url.rstrip("/") + "/"
    found: list[str] = []
    todo = [""]
    while todo:
        rel = todo.pop()
        files, folders = parse_listing(read_page(root_url + urllib.parse.quote(rel), timeout))
        for name in files:
            path = rel + name
            if matches(path, patterns):
                found.append(path)
        for name in folders:
            sub = rel + name
            if could_contain(sub, patterns):
                todo.append(sub + "/")
    return sorted(found)
