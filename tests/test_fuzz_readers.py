"""Random truncation and corruption of every input format we read (STAR, cryoSPARC .cs, MRC, cryoDRGN
pickles) gives our one-line `InputError`, never a traceback from inside a library, and never a hang.

Hypothesis draws the damage (derandomized, so CI sees the same examples every run); each reader call runs
under a 10-second alarm, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import os
import pickle
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers_io import FIXTURE, small_dataset, write_stack

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from drgn_core.errors import InputError  # noqa: E402

# DRGN_FUZZ_EXAMPLES=500 DRGN_FUZZ_RANDOM=1 runs a longer, randomized search (locally, not in CI).
FUZZ = settings(max_examples=int(os.environ.get("DRGN_FUZZ_EXAMPLES", "40")), deadline=None,
                derandomize=not os.environ.get("DRGN_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@contextmanager
def alarm(seconds: int = 10):
    def fail(signum, frame):
        raise TimeoutError(f"reader still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@st.composite
def damage(draw, size: int):
    """('truncate', at) or ('corrupt', [(offset, byte), …]) or ('insert', offset, bytes)."""
    kind = draw(st.sampled_from(["truncate", "corrupt", "insert"]))
    if kind == "truncate":
        return ("truncate", draw(st.integers(0, size - 1)))
    if kind == "corrupt":
        n = draw(st.integers(1, 8))
        return ("corrupt", draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)),
                                         min_size=n, max_size=n)))
    return ("insert", draw(st.integers(0, size)), draw(st.binary(min_size=1, max_size=16)))


def damaged(data: bytes, how) -> bytes:
    if how[0] == "truncate":
        return data[:how[1]]
    if how[0] == "corrupt":
        b = bytearray(data)
        for off, v in how[1]:
            b[off] = v
        return bytes(b)
    return data[:how[1]] + how[2] + data[how[1]:]


def check(reader, path: Path, data: bytes, how) -> None:
    """`reader(path)` on the damaged bytes either succeeds or raises InputError naming the file."""
    path.write_bytes(damaged(data, how))
    with alarm():
        try:
            reader(path)
        except InputError as e:
            assert str(e).startswith(str(path)) or str(path) in str(e), str(e)
            assert "\n" not in str(e)


# ---- STAR -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def star_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("star")
    star, _ = small_dataset(root)
    return star, star.read_bytes()


@FUZZ
@given(data=st.data())
def test_star_damage_gives_input_error(star_dataset, data):
    from drgn_core.importing import import_particles

    star, good = star_dataset
    how = data.draw(damage(len(good)))
    check(lambda p: import_particles(p), star.with_name("fuzz.star"), good, how)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("data_loop_rln# \n\t\"'0123456789.-@xyzAB")), max_size=400))
def test_star_reader_on_arbitrary_text(tmp_path_factory, text):
    from drgn_core.io.star_format import read_star_blocks

    path = tmp_path_factory.mktemp("arb") / "x.star"
    check(read_star_blocks, path, text.encode(), ("insert", 0, b""))


# ---- cryoSPARC .cs (numpy format and the compressed stream format) --------------------------------
def _cs_case(tmp_path_factory, data, name: str) -> None:
    from drgn_core.io.cs import read_cs

    good = (FIXTURE / name).read_bytes()
    how = data.draw(damage(len(good)))
    check(lambda p: read_cs(p, datadir=FIXTURE), tmp_path_factory.mktemp("cs") / name, good, how)


@FUZZ
@given(data=st.data())
def test_cs_damage_gives_input_error(tmp_path_factory, data):
    _cs_case(tmp_path_factory, data, "particles.cs")


@settings(FUZZ, max_examples=10)  # each example starts a decoder process (~1 s)
@given(data=st.data())
def test_cs_stream_format_damage_gives_input_error(tmp_path_factory, data):
    """cryosparc-tools' stream decoder segfaults on some truncated files: we must report, not crash."""
    _cs_case(tmp_path_factory, data, "particles_csdat.cs")


def test_truncated_stream_format_cs_is_reported(tmp_path):
    """A truncation that crashes cryosparc-tools' decoder in-process (SIGSEGV) is an InputError here."""
    from drgn_core.io.cs import load_dataset

    good = (FIXTURE / "particles_csdat.cs").read_bytes()
    bad = tmp_path / "cut.cs"
    bad.write_bytes(good[:len(good) // 2])
    with pytest.raises(InputError, match=r"cut.cs: cannot read as a cryoSPARC .cs file \(damaged or "
                                         r"truncated stream format: "):
        load_dataset(bad)


# ---- MRC ------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile's permissive mode warns about the damage
@FUZZ
@given(data=st.data())
def test_mrc_damage_gives_input_error(tmp_path_factory, data):
    from drgn_core.io.mrc import read_mrc, read_stack_header

    root = tmp_path_factory.mktemp("mrc")
    images = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
    good = write_stack(root / "good.mrcs", images).read_bytes()
    how = data.draw(damage(1024 + 64))  # the header and the start of the data: where damage matters

    def read(p: Path) -> None:
        read_stack_header(p)
        arr, _ = read_mrc(p)
        np.asarray(arr[0])

    check(read, root / "bad.mrcs", good, how)


# ---- cryoDRGN pickles -----------------------------------------------------------------------------
@FUZZ
@given(data=st.data(), which=st.sampled_from(["poses", "ctf", "ind"]))
def test_pickle_damage_gives_input_error(tmp_path_factory, data, which):
    from drgn_core.io.pickles import read_ctf_pkl, read_index_pkl, read_poses_pkl

    rng = np.random.default_rng(0)
    obj = {"poses": (np.tile(np.eye(3), (4, 1, 1)), rng.normal(size=(4, 2)) * 0.01),
           "ctf": np.tile(np.array([64, 2, 1e4, 1e4, 0, 300, 2.7, 0.1, 0], dtype=np.float32), (4, 1)),
           "ind": [np.int64(3), np.int64(0), np.int64(2)]}[which]
    good = pickle.dumps(obj, protocol=3)
    reader = {"poses": read_poses_pkl, "ctf": read_ctf_pkl, "ind": read_index_pkl}[which]
    how = data.draw(damage(len(good)))
    check(lambda p: reader(p, allow_pickle=True), tmp_path_factory.mktemp("pkl") / f"{which}.pkl", good, how)


# ---- a damaged second file (--poses) --------------------------------------------------------------
@settings(FUZZ, max_examples=20)
@given(data=st.data(), name=st.sampled_from(["particles.cs", "particles_relion31.star"]))
def test_damaged_poses_file_gives_input_error(tmp_path_factory, data, name):
    from drgn_core.importing import import_particles

    good = (FIXTURE / name).read_bytes()
    how = data.draw(damage(len(good)))
    check(lambda p: import_particles(FIXTURE / "particles_relion31.star", poses=p),
          tmp_path_factory.mktemp("poses") / name, good, how)
