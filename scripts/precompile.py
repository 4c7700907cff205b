"""Import every module drgn_core imports, writing their bytecode into .venv once (scripts/setup.sh).

Why: uv installs packages without compiling them (pip compiles every file, which is most of its
install time), and where PYTHONDONTWRITEBYTECODE is set Python never writes what it compiles. Then
every `drgn` process of a workflow compiled its imports again from source: 20 s of CPU for one
`drgn analyze`. Importing here, with bytecode writing on for this process only, compiles just the
modules drgn_core can reach (about a quarter of the environment's files), each once. It also fills
numba's disk cache of pynndescent, which importing umap-learn compiles.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
import warnings
from pathlib import Path

# beyond what drgn_core names: the workflow engine and its report, which every rule's job starts from
EXTRA = ("snakemake.cli", "snakemake.report", "matplotlib.pyplot")


def imported_modules(package_dir: Path) -> set[str]:
    """Every absolute module name imported anywhere in the package's source, at any depth."""
    names: set[str] = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return names


def main() -> int:
    sys.dont_write_bytecode = False  # for this process: every import below is written to __pycache__
    import drgn_core

    ours = [m.name for m in pkgutil.walk_packages(drgn_core.__path__, "drgn_core.")]
    theirs = sorted(imported_modules(Path(drgn_core.__file__).parent) - set(ours))
    failed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in [*ours, *theirs, *EXTRA]:
            try:
                importlib.import_module(name)
            except Exception:  # optional peers (e.g. playwright in a run-only set-up) may be absent
                failed.append(name)
    print(f"precompiled the imports of {len(ours)} drgn_core modules ({len(failed)} optional ones absent)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
