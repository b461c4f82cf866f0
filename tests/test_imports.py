"""The import graph, read from the code's own import statements (lazy ones inside functions
included): harness imports detectors, never the reverse; no library module imports a CLI
module; and no module reaches itself again (no circle)."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("detectors", "harness")
CLI = ("harness.cli", "harness.commands")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from harness import bench` names the module harness.bench.
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            targets |= {n for n in names if n in modules and n != name}
        # A package's __init__ is not an arrow worth a circle: importing harness.x runs harness/__init__.
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    return graph


def test_detectors_never_imports_harness():
    for name, targets in _graph().items():
        if name.startswith("detectors"):
            assert not [t for t in targets if t.startswith("harness")], name


def test_no_library_module_imports_a_cli_module():
    for name, targets in _graph().items():
        if not name.startswith(CLI):
            assert not [t for t in targets if t.startswith(CLI)], name


def test_no_import_circle():
    graph = _graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, ())
        return seen

    circles = sorted(name for name in graph if name in reach(name))
    assert not circles, f"modules that import themselves through others: {circles}"
