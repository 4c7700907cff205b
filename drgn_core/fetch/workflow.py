"""The `empiar` input mode of the workflow: where fetched files land, and the `drgn fetch` commands.

The workflow's fetch rule and `drgn check-config` both read the `empiar` config section through these
functions, so the paths a rule declares and the paths the checks name are the same. Nothing here touches
the network: the rule runs the commands, a dry run only names them.
"""

from __future__ import annotations

import os
import re
import shlex
import urllib.parse

from drgn_core.fetch.listing import is_literal, matches

SOURCES = ("particles", "poses", "ctf")
CHECKSUM = re.compile(r"^(sha256:[0-9a-fA-F]{64}|git:[0-9a-fA-F]{40})$")


def url_name(url: str) -> str:
    return os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))


def fetched_path(config: dict, key: str) -> str:
    """Local path of empiar.<key> (particles, poses or ctf) once fetched; '' when not configured.

    A file of the entry lands at <folder>/<its path in the entry>; a published URL at
    <folder>/inputs/<its file name>.
    """
    e = config["empiar"]
    src = e[key]
    if src.get("file"):
        return f"{e['folder']}/{src['file'].strip('/')}"
    if src.get("url"):
        return f"{e['folder']}/inputs/{url_name(src['url'])}"
    return ""


def import_datadir(config: dict) -> str:
    """The folder stack paths are relative to: <folder>/<empiar.datadir>, or '' (the particle file's)."""
    e = config["empiar"]
    return f"{e['folder']}/{e['datadir'].strip('/')}" if e["datadir"] else ""


def fetch_commands(config: dict, quiet: bool = True) -> list[list[str]]:
    """argv of each `drgn fetch` the workflow's fetch rule runs: each published URL, then the entry.

    The entry's fetch comes last and reads the particle file (`--stacks-of`): every stack it names that
    is not on disk is fetched by exact path, and the rule fails (so it is not marked done) while one is
    absent. empiar.include may therefore name the particle file alone, or nothing when it is a URL.
    """
    e = config["empiar"]
    common = ["--connections", str(e["connections"])] + (["--quiet"] if quiet else [])
    cmds = []
    for key in SOURCES:
        src = e[key]
        if src.get("url"):
            cmds.append(["drgn", "fetch", src["url"], "--checksum", src["checksum"], "-o",
                         f"{e['folder']}/inputs", *common])
    entry = ["drgn", "fetch", e["accession"], "-o", e["folder"]]
    if e["include"]:
        entry += ["--include", *e["include"]]
    entry += ["--stacks-of", fetched_path(config, "particles")]
    if import_datadir(config):
        entry += ["--stacks-datadir", import_datadir(config)]
    entry += common
    if e["api_base"]:
        entry += ["--api-base", e["api_base"]]
    if e["data_base"]:
        entry += ["--data-base", e["data_base"]]
    return [*cmds, entry]


def fetch_shell(config: dict) -> str:
    """The commands of `fetch_commands` as one shell line (each must succeed)."""
    return " && ".join(shlex.join(c) for c in fetch_commands(config))


def config_problems(config: dict) -> list[str]:
    """Rules of the `empiar` section in input.mode empiar (schema types already checked). No file is
    looked for: none exists before the fetch rule runs."""
    p: list[str] = []
    inp, e = config["input"], config["empiar"]
    if not e["accession"]:
        p.append("key 'empiar.accession': input.mode empiar needs an accession, e.g. EMPIAR-10076")
    for key in ("path", "datadir"):
        if inp[key]:
            p.append(f"key 'input.{key}': must be empty with input.mode empiar (found {inp[key]!r}); use "
                     f"empiar.{'particles' if key == 'path' else 'datadir'}")
    for key in SOURCES:
        src = e[key]
        given = [k for k in ("file", "url") if src.get(k)]
        if len(given) > 1:
            p.append(f"key 'empiar.{key}': give file (a file of the entry) or url (a published file), "
                     "not both")
        if key == "particles" and not given:
            p.append("key 'empiar.particles': name the file holding the particles (file: data/x.star, or "
                     "url: ... with checksum:)")
        if src.get("file") and not matches(src["file"].strip("/"), [i.strip("/") for i in e["include"]]):
            p.append(f"key 'empiar.{key}.file': {src['file']} is not among the files empiar.include fetches")
        if src.get("url"):
            if not src["url"].startswith(("http://", "https://")):
                p.append(f"key 'empiar.{key}.url': {src['url']!r} is not an http(s) URL")
            if not CHECKSUM.match(src.get("checksum", "")):
                p.append(f"key 'empiar.{key}.checksum': a URL needs sha256:<64 hex> or git:<40 hex> (a git "
                         f"blob id), found {src.get('checksum', '')!r}")
        elif src.get("checksum"):
            p.append(f"key 'empiar.{key}.checksum': only a url is checked against a checksum")
        if key != "particles" and given and inp[key]:
            p.append(f"key 'input.{key}': give the {key} file in input.{key} or in empiar.{key}, not both")
        path = fetched_path(config, key)
        if key != "particles" and path.endswith(".pkl") and not inp["allow_pickle"]:
            p.append(f"key 'empiar.{key}': {path} is a cryoDRGN pickle; set input.allow_pickle: true to "
                     "read it")
    names = [url_name(e[k]["url"]) for k in SOURCES if e[k].get("url")]
    if len(set(names)) < len(names):
        p.append("key 'empiar': two URLs end in the same file name; they would overwrite each other")
    for pat in e["include"]:
        if is_literal(pat) and pat != pat.strip():
            p.append(f"key 'empiar.include': {pat!r} has surrounding spaces")
    return p
