"""The package's shape: no import circle between modules, and one module that talks to the teacher's API."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "selfinstruct"


def imports_of(path: Path) -> set[str]:
    """selfinstruct modules a file imports, at module level or inside a function (a deferred import is still a dependency)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selfinstruct."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "selfinstruct":
            found.update(alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("selfinstruct."))
    return found


def third_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_import_circle_between_modules():
    # card <-> export was one (each imported the other inside functions).
    graph = {p.stem: imports_of(p) for p in PACKAGE.glob("*.py")}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_only_the_teacher_module_imports_openai():
    importers = sorted(p.name for p in PACKAGE.glob("*.py") if "openai" in third_party_imports(p))
    assert importers == ["teacher.py"]
