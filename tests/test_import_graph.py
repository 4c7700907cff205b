"""drgn_core's import graph has no cycle, and no helper is defined in two modules.

The check is scripts/import_graph.py (`python scripts/import_graph.py`, documented in
docs/architecture.md); here it runs on drgn_core and, to show it can fail, on a small package with a
known cycle.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "import_graph.py"

_spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root / "pkg"


def test_finds_a_cycle_through_a_lazy_and_a_relative_import(tmp_path, capsys):
    pkg = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import f\n",
        "pkg/b.py": "def f():\n    from . import c\n",                       # lazy, relative
        "pkg/c.py": "from pkg import a\n",                                      # closes a -> b -> c -> a
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n",
        "pkg/e.py": "import pkg.d\n",                                           # d -> e never runs: no cycle
        "pkg/sub/__init__.py": "from .x import y\n",
        "pkg/sub/x.py": "y = 1\n",
    })
    graph = import_graph.import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.d"] == set() and graph["pkg.sub"] == {"pkg.sub.x"}
    assert import_graph.cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert import_graph.main([str(pkg)]) == 1
    assert capsys.readouterr().out == ("import cycle: pkg.a -> pkg.b -> pkg.c -> pkg.a  "
                                       "(modules: pkg.a, pkg.b, pkg.c)\n")
    (tmp_path / "pkg" / "c.py").write_text("")
    assert import_graph.main([str(pkg)]) == 0
    assert capsys.readouterr().out == "no import cycles (8 modules, 4 imports)\n"


def test_drgn_core_import_graph_is_acyclic():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("no import cycles")


def test_no_helper_is_defined_in_two_modules():
    """Each top-level function or class name of drgn_core (outside the thin command modules, which all
    define add_parser/run by contract) lives in one module. The one exception is two different things
    that share a name: train.evaluate (validation loss during training) and the evaluate module's
    evaluate (the metrics of drgn evaluate)."""
    homes: dict[str, list[str]] = defaultdict(list)
    for f in sorted((REPO / "drgn_core").rglob("*.py")):
        if "commands" in f.parts:
            continue
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                homes[node.name].append(str(f.relative_to(REPO)))
    twice = {name: where for name, where in homes.items() if len(where) > 1}
    assert twice == {"evaluate": ["drgn_core/evaluate.py", "drgn_core/train.py"]}
    for name, home in (("load_run", "rundir"), ("held_out_mask", "rundir"), ("resolve_device", "rundir"),
                       ("decode_volumes", "rundir"), ("read_index_file", "io/indices"),
                       ("write_index_files", "io/indices")):
        assert homes[name] == [f"drgn_core/{home}.py"], name
