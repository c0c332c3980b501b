"""Imports run one way: ``utils`` <- ``data``, ``models`` <- ``trainer`` <- the CLIs.

Every import in ``codebase/`` is read from the source (also those inside functions), so a
lower layer cannot reach a higher one by hiding the import in a function, and no two modules
may import each other, directly or around a longer circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

CODEBASE = Path(__file__).resolve().parents[1] / "codebase"
LAYERS = {"utils": 0, "data": 1, "models": 1, "trainer": 2, "train": 3, "synthesize": 3}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(CODEBASE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in CODEBASE.rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            ]
        else:
            continue
        found += [(n, node.lineno) for n in names if n.split(".")[0] in LAYERS]
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_no_module_imports_a_higher_layer():
    wrong = []
    for name, imports in graph().items():
        for target, line in imports:
            if LAYERS[target.split(".")[0]] > LAYERS[name.split(".")[0]]:
                wrong.append(f"{name}:{line} imports {target}")
    assert not wrong, (
        "imports against the layering (utils <- data, models <- trainer <- CLIs):\n"
        + "\n".join(wrong)
    )


def test_no_import_cycles():
    edges = {
        name: {t for t, _ in imports if t != name and t in project_modules()}
        for name, imports in graph().items()
    }
    cycles = strongly_connected(edges)
    assert not cycles, "modules that import each other (directly or in a circle):\n" + "\n".join(
        " <-> ".join(sorted(c)) for c in cycles
    )


def strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm; the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_check_sees_function_level_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from trainer.config import Experiment\n")
    assert imports_of(src, {"trainer.config": src}) == [("trainer.config", 2)]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
