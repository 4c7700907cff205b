"""`drgn fetch` against a loopback server that behaves like EMPIAR (tests/empiar_server.py)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from empiar_server import FakeEmpiar, api_body

from drgn_core.cli import main
from drgn_core.errors import DrgnError
from drgn_core.fetch.api import parse_entry
from drgn_core.fetch.listing import parse_listing
from drgn_core.fetch.verify import git_blob_id, mrc_expected_size
from drgn_core.io.mrc import write_mrc

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--quiet", "--backoff", "0.02", "--chunk-size", "256K"]


def _entry_files(root: Path, n_stacks: int = 3, n_images: int = 40, seed: int = 0) -> dict[str, bytes]:
    """EMPIAR-10999 laid out as on EBI: data/Parameters.star and data/stacks/*.mrcs (64x64 float32)."""
    rng = np.random.default_rng(seed)
    base = root / "10999"
    (base / "data" / "stacks").mkdir(parents=True)
    (base / "data" / "Parameters.star").write_text("data_\nloop_\n_rlnImageName #1\n1@stacks/a.mrcs\n")
    for k in range(n_stacks):
        write_mrc(base / "data" / "stacks" / f"L17_{k}.mrcs",
                  rng.standard_normal((n_images, 64, 64)).astype(np.float32), 1.31, stack=True)
    (base / "data" / "other.txt").write_text("not included\n")
    return {str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*") if p.is_file()}


@pytest.fixture
def server(tmp_path):
    files = _entry_files(tmp_path / "srv")
    with FakeEmpiar(tmp_path / "srv", {"EMPIAR-10999": api_body("10999"),
                                       "EMPIAR-10998": api_body("10998", status="HPUB")},
                    lifetime=120) as srv:
        srv.files = files
        yield srv


def _args(srv: FakeEmpiar, out: Path, *extra: str) -> list[str]:
    return ["fetch", "EMPIAR-10999", "-o", str(out), "--api-base", srv.api_base, "--data-base",
            srv.data_base, *FAST, *extra]


INCLUDE = ["--include", "data/Parameters.star", "data/stacks/L17*"]


def _same(out: Path, files: dict[str, bytes], names) -> None:
    for name in names:
        assert (out / name).read_bytes() == files[name], name
    leftovers = [p.name for p in out.rglob(".*.part*")]
    assert leftovers == []


def test_api_loose_types_and_listing_parser():
    body = api_body("10999", n_images="131,899")  # a thousands separator: not a number
    entry = parse_entry({"EMPIAR-10999": body}, "10999", "u")
    assert entry.imagesets[0].count is None and entry.imagesets[0].pixel_size == 1.31
    assert entry.warnings == ["field imagesets[0].num_images_or_tilt_series = '131,899' is not a "
                              "number; ignored"]
    again = parse_entry({"EMPIAR-10999": api_body("10999", n_images="1000")}, "10999", "u")
    assert again.imagesets[0].count == 1000
    with pytest.raises(DrgnError, match=r"^u: unknown accession EMPIAR-10999 \(the API has no entry of that "
                       r"name\)$"):
        parse_entry({}, "EMPIAR-10999", "u")  # an API answering 200 with nothing
    with pytest.raises(DrgnError, match="'EMD-1234' is not an EMPIAR accession"):
        parse_entry({}, "EMD-1234", "u")
    html = ('<a href="?C=N;O=D">Name</a><a href="/empiar/">Parent Directory</a><a href="Particles/">P/</a>'
            '<a href="a%20b.mrcs">a b.mrcs</a><a href="https://x/y">y</a>')
    assert parse_listing(html) == (["a b.mrcs"], ["Particles"])


def test_mrc_header_size(tmp_path):
    write_mrc(tmp_path / "s.mrcs", np.zeros((3, 8, 6), np.float32), 1.0, stack=True)
    raw = (tmp_path / "s.mrcs").read_bytes()
    assert mrc_expected_size(raw[:1024]) == len(raw) == 1024 + 3 * 8 * 6 * 4 + int.from_bytes(raw[92:96],
                                                                                               "little")


def test_full_fetch_survives_omission_drop_and_wrong_length(server, tmp_path, capsys):
    out = tmp_path / "out"
    server.omit_once.add("10999/data/Parameters.star")
    server.drop_once["10999/data/stacks/L17_1.mrcs"] = 100_000
    server.bad_length_once.add("10999/data/stacks/L17_2.mrcs")
    assert main(_args(server, out, *INCLUDE)) == 0
    names = ["data/Parameters.star"] + [f"data/stacks/L17_{k}.mrcs" for k in range(3)]
    _same(out, server.files, names)
    assert not (out / "data" / "other.txt").exists()
    manifest = json.loads((out / "drgn-fetch-manifest.json").read_text())["files"]
    assert sorted(manifest) == names
    for n in names:
        assert manifest[n]["sha256"] == hashlib.sha256(server.files[n]).hexdigest()
        assert manifest[n]["size"] == len(server.files[n])
    assert server.peak <= 8
    # The drop and the short body were retried from where they stopped, so little was sent twice.
    data = sum(len(server.files[n]) for n in names)
    assert data <= server.bytes_sent <= data + 2 * 65536 + 4096
    # A re-run is a no-op: no file is probed or fetched again.
    server.requests.clear()
    sent = server.bytes_sent
    assert main(_args(server, out, *INCLUDE)) == 0
    assert server.bytes_sent == sent
    assert [r for r in server.requests if r[0] == "HEAD" or r[2]] == []
    assert "0 fetched (0 B transferred), 4 already complete and verified" in capsys.readouterr().out


def test_503_above_eight_connections_is_retried(server, tmp_path):
    out = tmp_path / "out"
    server.rate = 4e6  # slow enough that 12 requests overlap
    server.max_connections = 4  # well below 12, so that 503s come however the machine schedules us
    assert main(_args(server, out, *INCLUDE, "--connections", "12", "--chunk-size", "64K", "--retries",
                      "30")) == 0
    assert server.refused > 0
    _same(out, server.files, [f"data/stacks/L17_{k}.mrcs" for k in range(3)])


def test_dry_run_lists_sizes_and_total(server, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(server, out, *INCLUDE, "--dry-run")) == 0
    lines = capsys.readouterr().out.splitlines()
    sizes = {n: len(server.files[n]) for n in ["data/Parameters.star"]
             + [f"data/stacks/L17_{k}.mrcs" for k in range(3)]}
    assert [ln.split()[1] for ln in lines[:-1]] == sorted(sizes)
    assert [int(ln.split()[2].replace(",", "")) for ln in lines[:-1]] == [sizes[n] for n in sorted(sizes)]
    assert lines[-1].startswith(f"4 files, {sum(sizes.values()):,d} bytes")
    assert not out.exists() or not any(out.rglob("*"))
    assert server.bytes_sent == 0


def test_kill9_then_resume_is_byte_identical_and_cheap(tmp_path):
    files = _entry_files(tmp_path / "srv", n_stacks=4, n_images=100, seed=1)  # 4 x 1.6 MB
    names = [n for n in files if n.endswith(".mrcs")]
    data = sum(len(files[n]) for n in names)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with FakeEmpiar(tmp_path / "srv", {"EMPIAR-10999": api_body("10999")}, rate=1.5e6, lifetime=120) as srv:
        cmd = [sys.executable, "-m", "drgn_core.cli", *_args(srv, out, "--include", "data/stacks/*",
                                                             "--connections", "4")]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while srv.bytes_sent < 0.4 * data and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = srv.bytes_sent
        assert 0.3 * data < first < data
        assert list(out.rglob(".*.part"))  # killed mid-way: partial files, resumed below
        # Other settings on the rerun: partial files keep the chunking they were started with.
        cmd += ["--connections", "8", "--chunk-size", "1M"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert srv.bytes_sent <= 1.1 * data
    _same(out, files, names)


def test_corrupted_file_is_detected_and_repaired(server, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(server, out, *INCLUDE)) == 0
    f = out / "data" / "stacks" / "L17_0.mrcs"
    raw = bytearray(f.read_bytes())
    raw[5000] ^= 0xFF
    f.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(_args(server, out, *INCLUDE)) == 2
    err = capsys.readouterr().err
    assert err == (f"drgn fetch: error: 1 fetched file(s) changed since they were fetched: {f}: sha256 "
                   "differs from the one recorded when it was fetched (manifest "
                   f"{out / 'drgn-fetch-manifest.json'}) (run with --repair to fetch them again)\n")
    assert main(_args(server, out, *INCLUDE, "--repair")) == 0
    _same(out, server.files, ["data/stacks/L17_0.mrcs"])


def _error(capsys, argv, notes: int = 0) -> str:
    """The error line of a failing `drgn fetch` (after `notes` lines of notes, if expected)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 + notes, err
    return err.splitlines()[-1]


def test_errors_unknown_unreleased_404_and_omitted(server, tmp_path, capsys):
    out = tmp_path / "out"
    a = _args(server, out, *INCLUDE)
    unknown = [x if x != "EMPIAR-10999" else "EMPIAR-12345" for x in a]
    assert _error(capsys, unknown) == (f"drgn fetch: error: {server.api_base}/entry/EMPIAR-12345/: unknown "
                                       "or unreleased accession EMPIAR-12345 (HTTP 404)")
    held = [x if x != "EMPIAR-10999" else "10998" for x in a]
    assert _error(capsys, held) == (f"drgn fetch: error: {server.api_base}/entry/EMPIAR-10998/: EMPIAR-10998 "
                                    "is not released (status 'HPUB'); its files are not public yet")
    url = f"{server.data_base}/10999/data/missing.star"
    assert _error(capsys, ["fetch", url, "--checksum", "sha256:" + "0" * 64, "-o", str(out), *FAST]) == (
        f"drgn fetch: error: {url}: not found on the server (HTTP 404)")
    assert _error(capsys, _args(server, out, "--include", "data/Gone.star")) == (
        f"drgn fetch: error: {server.data_base}/10999/data/Gone.star: named by --include but missing from "
        f"the listing of {server.data_base}/10999/data/ and not served either")
    assert _error(capsys, _args(server, out, "--include", "data/L99*")) == (
        f"drgn fetch: error: {server.data_base}/10999/: --include 'data/L99*' matches no file of "
        "EMPIAR-10999's listing")
    assert not out.exists() or not list(out.rglob("*.mrcs"))


def test_size_change_midway_stops_then_restarts(server, tmp_path, capsys):
    out = tmp_path / "out"
    name = "data/stacks/L17_0.mrcs"
    new = bytearray(server.files[name])
    new = bytes(new[:1024]) + bytes(new[1024 + 64 * 64 * 4:])  # one image fewer (header stays: invalid)
    server.replace_after[f"10999/{name}"] = (300_000, new)
    err = _error(capsys, _args(server, out, "--include", name, "--connections", "1", "--chunk-size", "128K"))
    url = f"{server.data_base}/10999/{name}"
    old = len(server.files[name])
    assert err == (f"drgn fetch: error: {url}: the file's size changed mid-way, from {old} to {len(new)} "
                   "bytes (replaced on the server); the partial data is kept, run again to fetch the new "
                   "version")
    assert (out / "data" / "stacks" / ".L17_0.mrcs.part").exists()
    # The new file's MRC header still claims the old image count: the next run refuses to accept it.
    err = _error(capsys, _args(server, out, "--include", name), notes=1)
    assert err == (f"drgn fetch: error: {url}: its MRC header implies {len(server.files[name])} bytes but "
                   f"the server's file has {len(new)}; the server's copy is truncated or padded, so it is "
                   "not accepted")
    assert not (out / name).exists()


def test_url_with_git_blob_checksum(server, tmp_path, capsys):
    name = "data/Parameters.star"
    src = tmp_path / "srv" / "10999" / name
    url = f"{server.data_base}/10999/{name}"
    out = tmp_path / "in"
    assert main(["fetch", url, "--checksum", f"git:{git_blob_id(src)}", "-o", str(out), *FAST]) == 0
    assert (out / "Parameters.star").read_bytes() == server.files[name]
    want = hashlib.sha1(b"blob %d\0" % len(server.files[name]) + server.files[name]).hexdigest()
    assert git_blob_id(src) == want
    err = _error(capsys, ["fetch", url, "--checksum", "sha256:" + "1" * 64, "-o", str(tmp_path / "x"), *FAST])
    got = hashlib.sha256(server.files[name]).hexdigest()
    assert err == (f"drgn fetch: error: {url}: sha256 checksum is {got}, expected {'1' * 64}; the download "
                   "was deleted (the URL serves other content than the one expected)")
    # Nothing but the folder's (empty) fetch lock, which stays: unlinking a lock file races other fetches.
    assert [p.name for p in (tmp_path / "x").iterdir()] == [".drgn-fetch.lock"]
    assert (tmp_path / "x" / ".drgn-fetch.lock").stat().st_size == 0


def _limit_fsize(limit: int):
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_full_disk_is_one_line_and_resumable(server, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "drgn_core.cli", *_args(server, out, *INCLUDE, "--connections", "1")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60,
                          preexec_fn=_limit_fsize(300_000))
    assert done.returncode == 2
    part = out / "data" / "stacks" / ".L17_0.mrcs.part"
    assert done.stderr == (f"drgn fetch: error: {part}: disk full while writing data/stacks/L17_0.mrcs "
                           "(File too large); free some space and run again: the partial data is kept and "
                           "resumes\n")
    sent = server.bytes_sent
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    names = ["data/Parameters.star"] + [f"data/stacks/L17_{k}.mrcs" for k in range(3)]
    _same(out, server.files, names)
    assert server.bytes_sent - sent < sum(len(server.files[n]) for n in names) - 250_000


def test_complete_files_without_a_record_are_adopted_not_refetched(server, tmp_path):
    """A kill between a file's rename and its manifest record leaves it complete but unrecorded: the next
    run checks it (size, MRC header) and records it without fetching it again."""
    out = tmp_path / "out"
    assert main(_args(server, out, *INCLUDE)) == 0
    manifest = (out / "drgn-fetch-manifest.json").read_text()
    (out / "drgn-fetch-manifest.json").unlink()
    (out / "data" / "stacks" / ".L17_0.mrcs.part.idx").write_bytes(b"stale")
    sent = server.bytes_sent
    assert main(_args(server, out, *INCLUDE)) == 0
    assert server.bytes_sent == sent
    assert (out / "drgn-fetch-manifest.json").read_text() == manifest
    assert not (out / "data" / "stacks" / ".L17_0.mrcs.part.idx").exists()


def test_stacks_of_fetches_referenced_stacks_by_exact_path(server, tmp_path, capsys):
    """--include names the particle file alone; the stacks it names come by exact path, even the one the
    listing would leave out. A stack the server does not serve stops the fetch (exit 2, one line naming it
    and the URL tried); once it is served, the same command completes."""
    out = tmp_path / "out"
    star = server.root / "10999" / "data" / "Parameters.star"
    star.write_text("data_\nloop_\n_rlnImageName #1\n1@stacks/L17_0.mrcs\n2@stacks/L17_2.mrcs\n"
                    "1@stacks/L17_2.mrcs\n1@stacks/late.mrcs\n")
    server.files["data/Parameters.star"] = star.read_bytes()
    server.omit_once.add("10999/data/stacks/L17_2.mrcs")
    argv = _args(server, out, "--include", "data/Parameters.star", "--stacks-of",
                 str(out / "data" / "Parameters.star"))
    url = f"{server.data_base}/10999/data/stacks/late.mrcs"
    assert _error(capsys, argv) == (
        f"drgn fetch: error: stack stacks/late.mrcs named by {out / 'data' / 'Parameters.star'} is not on "
        f"disk and not served (tried {url}); the fetch is not complete, run again once the server serves it "
        "(or fix empiar.datadir)")
    _same(out, server.files, ["data/Parameters.star", "data/stacks/L17_0.mrcs", "data/stacks/L17_2.mrcs"])
    assert not (out / "data" / "stacks" / "L17_1.mrcs").exists()  # not named: not fetched
    shutil.copy(server.root / "10999" / "data" / "stacks" / "L17_1.mrcs",
                server.root / "10999" / "data" / "stacks" / "late.mrcs")
    assert main(argv) == 0
    assert (out / "data" / "stacks" / "late.mrcs").read_bytes() == server.files["data/stacks/L17_1.mrcs"]
    assert [r for r in server.requests if r[1].endswith("/stacks/")] == []  # the stacks' folder: never listed
    manifest = json.loads((out / "drgn-fetch-manifest.json").read_text())["files"]
    assert sorted(manifest) == ["data/Parameters.star", "data/stacks/L17_0.mrcs", "data/stacks/L17_2.mrcs",
                                "data/stacks/late.mrcs"]


def test_second_fetch_into_a_folder_waits_for_the_first(server, tmp_path):
    """Two fetches into one folder (a workflow rerun while the killed run's fetch still goes on) would
    finish the same files twice: the second waits for the first's lock, then finds everything done."""
    import threading

    from drgn_core.fetch.connections import folder_lock

    out = tmp_path / "out"
    result = {}
    with folder_lock(out):
        t = threading.Thread(target=lambda: result.setdefault("rc", main(_args(server, out, *INCLUDE))))
        t.start()
        time.sleep(1.0)
        assert t.is_alive() and server.bytes_sent == 0  # waiting, not fetching
    t.join(60)
    assert result["rc"] == 0
    _same(out, server.files, ["data/Parameters.star"] + [f"data/stacks/L17_{k}.mrcs" for k in range(3)])
