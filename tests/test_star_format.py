"""The table-free STAR reader/writer (drgn_core.io.star_format): round trip, and malformed files refused
with the file and the line (a duplicated column, a stray token in a data row, a short row)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_io import small_dataset

from drgn_core.cli import main
from drgn_core.errors import InputError
from drgn_core.io.star_format import read_star_blocks, write_star

HEADER = "data_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n_rlnDefocusV #3\n"


def write(tmp: Path, text: str) -> Path:
    p = tmp / "p.star"
    p.write_text(text)
    return p


def test_round_trip_keeps_values_and_strings(tmp_path):
    df = pd.DataFrame({"rlnImageName": ["000001@a b.mrcs", "000002@x.mrcs"], "rlnDefocusU": [1.5, 2.25],
                       "rlnClassNumber": [1, 2], "drgnUid": ["18446744073709551615", "7"],
                       "rlnMicrographName": ["", "m.mrc"]})
    kv = pd.DataFrame({"rlnOpticsGroup": [1], "rlnVoltage": [300.0]})
    write_star({"optics": kv, "particles": df}, tmp_path / "t.star")
    back = read_star_blocks(tmp_path / "t.star")
    pd.testing.assert_frame_equal(back["optics"], kv, check_dtype=False)  # 300.0 is written "300"
    assert back["particles"]["rlnImageName"].tolist() == df["rlnImageName"].tolist()
    assert back["particles"]["drgnUid"].tolist() == df["drgnUid"].tolist()  # uint64 kept exactly
    np.testing.assert_array_equal(back["particles"]["rlnDefocusU"], df["rlnDefocusU"])
    assert back["particles"]["rlnClassNumber"].tolist() == [1, 2]


def test_key_value_block(tmp_path):
    p = write(tmp_path, "data_general\n\n_rlnImageSizeX 64\n_rlnComment \"two words\" # note\n")
    assert read_star_blocks(p)["general"] == {"rlnImageSizeX": 64, "rlnComment": "two words"}


def test_duplicated_column_names_the_lines(tmp_path):
    p = write(tmp_path, HEADER + "_rlnDefocusU #4\n1@s.mrcs 1 2 3\n")
    with pytest.raises(InputError) as e:
        read_star_blocks(p)
    assert str(e.value) == (f"{p}: line 7 (data_particles): column _rlnDefocusU is declared twice (first on "
                            "line 5)")


def test_stray_token_in_a_data_row_names_the_line(tmp_path):
    """EMPIAR-10028's shiny_2sets.star has a stray '9' on one data row (its line 5476)."""
    rows = "".join(f"{i}@s.mrcs 1000 2000\n" for i in range(1, 9))
    rows = rows.replace("5@s.mrcs 1000 2000\n", "5@s.mrcs 1000 2000 9\n")
    p = write(tmp_path, HEADER + rows)
    with pytest.raises(InputError) as e:
        read_star_blocks(p)
    assert str(e.value) == (f"{p}: line 11 (data_particles): data row holds 4 values but the loop declares 3 "
                            "columns ('5@s.mrcs 1000 2000 9')")


def test_short_row_and_truncated_last_row_name_the_line(tmp_path):
    p = write(tmp_path, HEADER + "1@s.mrcs 1 2\n2@s.mrcs 1\n3@s.mrcs 1 2\n")
    with pytest.raises(InputError, match=r"line 8 \(data_particles\): data row holds 2 values but the loop "
                                         r"declares 3 columns \('2@s.mrcs 1'\)"):
        read_star_blocks(p)
    p = write(tmp_path, HEADER + "1@s.mrcs 1 2\n2@s.mrcs 1 2\n3@s.mr")
    with pytest.raises(InputError, match=r"line 9 \(data_particles\): data row holds 1 values"):
        read_star_blocks(p)


def test_a_real_nan_is_not_a_short_row(tmp_path):
    p = write(tmp_path, HEADER + "1@s.mrcs 1 nan\n2@s.mrcs 1 2\n")
    df = read_star_blocks(p)["particles"]
    assert np.isnan(df["rlnDefocusV"].iloc[0]) and df["rlnDefocusV"].iloc[1] == 2


def test_drgn_import_reports_the_line(tmp_path, capsys):
    star, _ = small_dataset(tmp_path)
    lines = star.read_text().splitlines(keepends=True)
    k = next(i for i, ln in enumerate(lines) if ln.startswith("000002@stacks/s1.mrcs"))
    lines[k] = lines[k].rstrip("\n") + " 9\n"
    star.write_text("".join(lines))
    out = tmp_path / "t.star"
    assert main(["import", str(star), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"drgn import: error: {star}: line {k + 1} (data_particles): data row holds 11 "
                          "values but the loop declares 10 columns")
    assert not out.exists()


def test_no_import_cycle_between_star_and_table():
    """io/star_format imports neither io/table nor io/star, and io/table does not import io/star."""
    code = ("import sys, drgn_core.io.table, drgn_core.io.star_format; "
            "print('drgn_core.io.star' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    code = "import sys, drgn_core.io.star_format; print('drgn_core.io.table' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
