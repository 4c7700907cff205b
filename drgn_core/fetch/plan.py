"""What to fetch: an EMPIAR entry's files matching the include globs, or one published URL.

The listing is cross-checked against what the user named: a literal path (no glob characters) missing
from the listing is looked for again (a load-balanced backend has been seen to omit a file from one
listing and show it in the next), then asked of the server directly, and only then reported.
"""

from __future__ import annotations

import os
import sys
import urllib.parse

from drgn_core.errors import DrgnError
from drgn_core.fetch import api, listing
from drgn_core.fetch.download import FetchOptions, RemoteFile, probe_size

LISTING_RETRIES = 2


def plan_entry(accession: str, include: list[str], api_base: str, data_base: str,
               opts: FetchOptions, walk_all: bool = True) -> tuple[api.Entry, list[RemoteFile]]:
    """The entry's metadata and the files to fetch (relative paths as on the server, e.g. data/x.mrcs).

    No include pattern means the whole entry, unless `walk_all` is false (the stacks then come from a
    particle file, `drgn fetch --stacks-of`): nothing is listed at all.
    """
    entry = api.fetch_entry(accession, api_base, timeout=opts.timeout)
    for w in entry.warnings:
        print(f"drgn fetch: {entry.accession}: API {w}", file=sys.stderr)
    root = f"{data_base.rstrip('/')}/{entry.number}/"
    patterns = [p.strip("/") for p in include]
    if not patterns and not walk_all:
        return entry, []
    paths = set(listing.walk(root, patterns, timeout=opts.timeout))
    for pat in patterns:
        if listing.is_literal(pat):
            if pat not in paths:
                paths |= _find_omitted(root, pat, opts)
        elif not any(listing.matches(p, [pat]) for p in paths):
            if walk_all:
                raise DrgnError(f"{root}: --include {pat!r} matches no file of {entry.accession}'s listing")
            # With --stacks-of the particle file says which stacks are needed: a listing that left them
            # out is made good by fetching them by exact path, so an empty glob is only worth a note.
            print(f"drgn fetch: {root}: --include {pat!r} matches no file of {entry.accession}'s listing; "
                  "the stacks the particle file names are fetched by exact path", file=sys.stderr)
    if not paths:
        raise DrgnError(f"{root}: the listing of {entry.accession} shows no files")
    files = [RemoteFile(rel=p, url=root + urllib.parse.quote(p)) for p in sorted(paths)]
    return entry, files


def _find_omitted(root: str, rel: str, opts: FetchOptions) -> set[str]:
    folder = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    for _ in range(LISTING_RETRIES):
        page = listing.read_page(root + urllib.parse.quote(folder), opts.timeout)
        files, _dirs = listing.parse_listing(page)
        if rel.rsplit("/", 1)[-1] in files:
            return {rel}
    url = root + urllib.parse.quote(rel)
    try:
        probe_size(url, opts)
    except DrgnError:
        raise DrgnError(f"{url}: named by --include but missing from the listing of {root + folder} and not "
                        "served either") from None
    print(f"drgn fetch: {url}: missing from the listing of {root + folder} but served; fetching it",
          file=sys.stderr)
    return {rel}


def plan_url(url: str, checksum: tuple[str, str], name: str | None) -> RemoteFile:
    """One published file (e.g. the paper's inputs on GitHub), verified against its expected checksum."""
    if not url.startswith(("http://", "https://")):
        raise DrgnError(f"{url}: not an http(s) URL")
    rel = name or os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if not rel:
        raise DrgnError(f"{url}: the URL names no file; give one with --name")
    return RemoteFile(rel=rel, url=url, checksum=checksum)


def env_or(value: str | None, var: str, default: str) -> str:
    """A base URL: the flag, else the environment variable, else the default (EBI)."""
    return value or os.environ.get(var) or default


