"""The stacks a particle file references, and fetching the missing ones by their exact path.

A directory listing is not a reliable inventory: EBI's load-balanced listings have left a file out, and
globs written by hand miss stacks or catch unrelated ones. The particle file itself is the inventory the
import will use. So once it is in, `drgn fetch --stacks-of FILE` reads the stack paths it names, resolves
each the way the importer will (`drgn_core.io.stacklist.candidate_paths`, with the same --datadir), and
for each stack found nowhere asks the server for it at the candidate paths that lie inside the fetch folder
(the entry's layout mirrors the folder's), by exact URL, no listing involved. A stack that no candidate
URL serves stops the fetch with one line naming it and the URLs tried, so a workflow's fetch rule is never
marked done with a referenced stack absent.

Only the particle file is read: a poses file from another program (a cryoSPARC `.cs` of the authors'
project) names the project's own copies of the stacks (J1/imported/...), which are not in the entry.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

import pandas as pd

from drgn_core.errors import DrgnError, InputError
from drgn_core.fetch.download import FetchOptions, RemoteFile, probe_size


def stack_refs(particle_file: str | os.PathLike) -> list[str]:
    """The distinct stack paths a RELION STAR (rlnImageName) or cryoSPARC .cs (blob/path) names, in
    order of first use. A `.txt` stack list names one stack per line."""
    path = Path(particle_file)
    suffix = path.suffix.lower()
    if suffix == ".star":
        from drgn_core.io.star import _pick_particle_block, parse_image_names
        from drgn_core.io.star_format import read_star_blocks

        _, block = _pick_particle_block(read_star_blocks(path), path)
        problems: list[str] = []
        _, refs = parse_image_names(block["rlnImageName"], problems)
        if problems:
            raise InputError("; ".join(problems[:3]), path)
    elif suffix == ".cs":
        from drgn_core.io.cs import _strings, load_dataset

        d = load_dataset(path)
        if "blob/path" not in d.fields():
            raise InputError("has no blob/path field: it names no particle stacks", path)
        refs = _strings(d["blob/path"]).str.removeprefix(">")
    elif suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        refs = pd.Series([ln for ln in lines if ln and not ln.startswith("#")], dtype=object)
    else:
        raise InputError(f"unknown particle file type '{path.suffix}' (expected .star, .cs or .txt)", path)
    return list(pd.unique(refs.astype(str)))


def missing_stacks(particle_file: str | os.PathLike, folder: str | os.PathLike,
                   datadir: str | os.PathLike | None) -> list[tuple[str, list[str]]]:
    """(stack reference, entry-relative candidate paths inside `folder`) for every referenced stack that
    the importer would find nowhere; candidates keep the importer's order of preference."""
    from drgn_core.io.stacklist import candidate_paths

    particle_file = Path(particle_file)
    base = particle_file.absolute().parent
    dd = Path(datadir).absolute() if datadir else None
    root = Path(folder).absolute()
    out = []
    for ref in stack_refs(particle_file):
        cands = candidate_paths(ref, base, dd)
        if any(c.is_file() for c in cands):
            continue
        inside = []
        for c in cands:
            norm = Path(os.path.normpath(str(c)))
            if norm.is_relative_to(root):
                inside.append(norm.relative_to(root).as_posix())
        out.append((ref, inside))
    return out


def plan_referenced(particle_file: str | os.PathLike, folder: str | os.PathLike,
                    datadir: str | os.PathLike | None, root_url: str, opts: FetchOptions
                    ) -> tuple[list[RemoteFile], list[str]]:
    """(the missing referenced stacks that the server serves, as files to fetch with sizes probed;
    one line per stack that no candidate URL serves). The caller fetches the first, then fails with
    `absent_error` if the second is not empty: what can be fetched is not held back by what cannot."""
    root_url = root_url.rstrip("/") + "/"
    files, absent = [], []
    for ref, cands in missing_stacks(particle_file, folder, datadir):
        tried = []
        for rel in cands:
            url = root_url + urllib.parse.quote(rel)
            tried.append(url)
            try:
                size = probe_size(url, opts)
            except DrgnError:
                continue
            files.append(RemoteFile(rel=rel, url=url, size=size))
            break
        else:
            where = ", ".join(tried) if tried else f"no URL (no candidate path lies inside {folder})"
            absent.append(f"stack {ref} named by {particle_file} is not on disk and not served (tried "
                          f"{where})")
    return files, absent


def absent_error(absent: list[str]) -> DrgnError:
    """One line for the stacks that stay absent (the first three named)."""
    more = f"; and {len(absent) - 3} more" if len(absent) > 3 else ""
    return DrgnError("; ".join(absent[:3]) + more + "; the fetch is not complete, run again once the "
                     "server serves it (or fix empiar.datadir)")
