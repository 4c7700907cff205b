#!/usr/bin/env python
"""Print the import cycles of a package (drgn_core by default); exit 1 when there is one.

    python scripts/import_graph.py            # drgn_core; "no import cycles (N modules, M imports)"
    python scripts/import_graph.py --edges    # also list every import edge, module by module

Why a script of our own: a cycle makes the import order matter (a half-initialised module raises
AttributeError/ImportError depending on which side is imported first) and it means two modules are one
concept split in two. The graph is read from the source with `ast`, nothing is imported, so the check
needs no dependency and works on a broken package too. Every `import` counts, including those inside
functions (a lazy import still ties the two modules together); imports under `if TYPE_CHECKING:` do
not (they never run). `from pkg import name` is an edge to `pkg.name` when that is a module, else to
`pkg`. Cycles are reported as strongly connected components, each with one concrete loop.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name → file, for every .py under the package directory."""
    root = package_dir.parent
    out = {}
    for f in sorted(package_dir.rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[str | None, int, list[str]]]:
    """(module or None, level, names) of every import statement that can run."""
    found: list[tuple[str | None, int, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, 0, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module, node.level, [a.name for a in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module → the package's modules it imports (edges inside the package only)."""
    files = module_files(package_dir)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        is_pkg = f.name == "__init__.py"
        for target, level, names in _imports(ast.parse(f.read_text(), str(f))):
            if level:  # relative import: resolve against this module's package
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - (level - 1)]
                target = ".".join(base + ([target] if target else []))
            if target is None:
                continue
            candidates = [f"{target}.{n}" for n in names if f"{target}.{n}" in files]
            if not candidates and target in files:
                candidates = [target]
            for c in candidates:
                if c != mod:
                    graph[mod].add(c)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(1000, 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def one_loop(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A concrete loop a → b → … → a inside a strongly connected component (shortest from its first)."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(prev[chain[-1]])
                    return [*reversed(chain), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parents[1] / "drgn_core"),
                    help="package folder (default: the repository's drgn_core)")
    ap.add_argument("--edges", action="store_true", help="print every import edge too")
    args = ap.parse_args(argv)
    pkg = Path(args.package)
    if not (pkg / "__init__.py").is_file():
        print(f"{pkg}: not a package folder (no __init__.py)", file=sys.stderr)
        return 2
    graph = import_graph(pkg)
    if args.edges:
        for mod in sorted(graph):
            print(f"{mod} -> {', '.join(sorted(graph[mod])) or '(nothing)'}")
    found = cycles(graph)
    if not found:
        print(f"no import cycles ({len(graph)} modules, {sum(map(len, graph.values()))} imports)")
        return 0
    for comp in found:
        print(f"import cycle: {' -> '.join(one_loop(graph, comp))}  (modules: {', '.join(comp)})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
