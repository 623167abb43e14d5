"""The package's shape: no import cycle among aockpt's modules, and modules of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "aockpt"
MAX_LINES = 420  # "modules of a few hundred lines": split by concept before one grows past this


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _top_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported (not inside functions, not TYPE_CHECKING blocks)."""
    found = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.dump(node.test):
            found += _top_level_imports(node.body) + _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            found += _top_level_imports(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                found += _top_level_imports(handler.body)
    return found


def _imports(name: str, path: Path, is_package: bool, modules: dict) -> set[str]:
    """The aockpt modules one module imports at import time, with the packages those imply."""
    targets = set()
    for node in _top_level_imports(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
            continue
        package = name.split(".") if is_package else name.split(".")[:-1]
        base = node.module or "" if node.level == 0 else ".".join(
            package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        targets.add(base)
        targets.update(f"{base}.{a.name}" for a in node.names)
    implied = {".".join(t.split(".")[:i]) for t in targets for i in range(2, t.count(".") + 2)}
    return {m for m in implied if m in modules and m != name and not name.startswith(m + ".")}


def test_no_import_cycle_in_aockpt():
    modules = _modules()
    graph = {name: _imports(name, path, is_package, modules) for name, (path, is_package) in modules.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(name):] + [name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, trail + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert "aockpt.registry" in graph and graph["aockpt.load"] >= {"aockpt.sources", "aockpt.codec"}  # it read them


def test_no_module_is_too_long():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concept: {long}"
