"""The package's shape: no import cycle among aockpt's modules (imports inside functions count), imports
inside functions only where they keep the torch-free entry points free of torch, modules of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "aockpt"
MAX_LINES = 400  # "modules of a few hundred lines": split by concept before one grows past this

# Imports inside functions, allowed by name: each keeps `aockpt --help` (cli -> cli_hub -> hub) or the git
# pre-push hook (hook -> publish_rules) from importing torch until the command that needs it runs.
LAZY = {
    ("aockpt.cli", "aockpt.api"): "aockpt --help",
    ("aockpt.hub", "aockpt.api"): "aockpt --help (cli_hub imports hub)",
    ("aockpt.hub", "aockpt.reader"): "aockpt --help (cli_hub imports hub)",
    ("aockpt.hub", "aockpt.pretrained"): "aockpt --help (cli_hub imports hub)",
    ("aockpt.hub", "aockpt.progress"): "aockpt --help (cli_hub imports hub)",
    ("aockpt.publish_rules", "aockpt.api"): "the git hook",
    ("aockpt.publish_rules", "aockpt.reader"): "the git hook",
    ("aockpt.hook", "aockpt"): "the git hook (finds the installed package)",
    ("aockpt.cli_serving", "aockpt.ct_export"): "aockpt --help",
}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imports_in(body: list[ast.stmt], *, top: bool) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run at import time (`top`), or those inside functions (not `top`); TYPE_CHECKING blocks
    never run."""
    found = []
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            node.body = []
    functions = [n for n in ast.walk(ast.Module(body=body, type_ignores=[]))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(i) for f in functions for i in ast.walk(f) if isinstance(i, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and (id(node) in inner) != top:
            found.append(node)
    return found


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, modules: dict) -> set[str]:
    """The aockpt modules one import statement loads, with the packages those imply."""
    targets = set()
    if isinstance(node, ast.Import):
        targets.update(a.name for a in node.names)
    else:
        package = name.split(".") if is_package else name.split(".")[:-1]
        base = node.module or "" if node.level == 0 else ".".join(
            package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        targets.add(base)
        targets.update(f"{base}.{a.name}" for a in node.names)
    implied = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 2)}
    return {m for m in implied if m in modules and m != name and not name.startswith(m + ".")}


def _imports(name: str, path: Path, is_package: bool, modules: dict, *, top: bool = True) -> set[str]:
    """The aockpt modules one module imports at import time (or, not `top`, inside its functions)."""
    body = ast.parse(path.read_text()).body
    return {t for node in _imports_in(body, top=top) for t in _targets(node, name, is_package, modules)}


def test_imports_inside_functions_are_only_the_allowed_ones():
    modules = _modules()
    lazy = {(name, dep) for name, (path, is_package) in modules.items()
            for dep in _imports(name, path, is_package, modules, top=False)}
    assert lazy <= set(LAZY), f"import these at the top of the module: {sorted(lazy - set(LAZY))}"


def test_no_import_cycle_in_aockpt():
    modules = _modules()
    graph = {name: _imports(name, path, is_package, modules) | _imports(name, path, is_package, modules, top=False)
             for name, (path, is_package) in modules.items()}
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


def test_the_architecture_page_names_every_module():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    unnamed = sorted(name for name, (path, is_package) in _modules().items()
                     if not is_package and f"{path.stem}" not in page)
    assert not unnamed, f"docs/architecture.md does not name {unnamed}"
