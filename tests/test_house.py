"""The package's layout: no import circle, short module docstrings, short functions.

The front ends (`lgf`, `lgf_adam`, Newton) sit on top, the two schedules' engines
under them, the shared engine parts under those and the toolkit at the bottom
(docs/design.md draws it); an import that climbs back up would make a circle.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lgfjax"
MODULES = sorted(PACKAGE.glob("*.py"))


def _imports(path: Path) -> set[str]:
    """The lgfjax modules `path` imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.module and node.module.startswith("lgfjax."):
                found.add(node.module.split(".")[1])
    return found - {path.stem}


def test_no_import_cycle():
    graph = {p.stem: _imports(p) for p in MODULES if p.stem != "__init__"}
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(path + [module])
        state[module] = "open"
        for other in sorted(graph.get(module, ())):
            visit(other, path + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


def test_the_check_finds_a_cycle(tmp_path):
    (tmp_path / "_a.py").write_text("from ._b import x\n")
    (tmp_path / "_b.py").write_text("def f():\n    from ._a import y\n")
    assert _imports(tmp_path / "_a.py") == {"_b"} and _imports(tmp_path / "_b.py") == {"_a"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_docstrings_are_short(path):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert len(doc.splitlines()) <= 45, f"{path.name}: {len(doc.splitlines())} lines"


def _code_lines(node, source_lines):
    """Lines of code of a function: its span less blank lines, comments and docstring."""
    doc = ast.get_docstring(node)
    body = node.body[1:] if doc is not None else node.body
    if not body:
        return 0
    lines = source_lines[body[0].lineno - 1 : node.end_lineno]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_functions_are_short(path):
    source = path.read_text()
    lines = source.splitlines()
    long = [
        f"{node.name}: {_code_lines(node, lines)}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and _code_lines(node, lines) > 100
    ]
    assert not long, f"{path.name}: functions over 100 lines of code: {long}"
